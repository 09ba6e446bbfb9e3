//! How the next token is drawn from a step's logits.
//!
//! An ordinary client sends a temperature and no `top_p` or `top_k`: the
//! whole distribution at that temperature. candle's `LogitsProcessor` draws
//! it in about six passes over the vocabulary (a division, a softmax with an
//! `exp` per token, a copy, a cumulative sum, a search) and three
//! allocations; with SmolLM2's 49,152 tokens that came to 5–6% of a decode
//! step once the step got fast (`benches/README.md`). [`Sampler`] draws it
//! with one pass for the maximum and one that takes the `exp` only of the
//! tokens within [`CUTOFF`] temperatures of it, into a buffer it keeps. Greedy decoding,
//! `top_p` and `top_k` stay with candle's.

use candle_core::{DType, Result, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How far below the most likely token's logit, divided by the temperature,
/// a token is still drawn: `e^-30` of its probability, so all those left
/// out together weigh under `5e-9` of it over a 49,152-token vocabulary,
/// below f32's rounding of the sum.
const CUTOFF: f32 = 30.0;

/// Draws tokens for one sequence.
pub enum Sampler {
    /// The whole distribution at `temperature`.
    Softmax {
        temperature: f32,
        rng: StdRng,
        /// The drawable tokens and their unnormalised weights, this step's.
        weights: Vec<(u32, f32)>,
    },
    /// candle's: greedy, `top_p`, `top_k`.
    Candle(LogitsProcessor),
}

impl Sampler {
    /// The sampler for these settings, seeded.
    pub fn new(seed: u64, temperature: f64, top_p: Option<f64>, top_k: Option<usize>) -> Self {
        if temperature <= 1e-7 {
            return Sampler::Candle(LogitsProcessor::from_sampling(seed, Sampling::ArgMax));
        }
        let sampling = match (top_k, top_p) {
            (None, None) => {
                return Sampler::Softmax {
                    temperature: temperature as f32,
                    rng: StdRng::seed_from_u64(seed),
                    weights: Vec::new(),
                }
            }
            (Some(k), Some(p)) => Sampling::TopKThenTopP { k, p, temperature },
            (Some(k), None) => Sampling::TopK { k, temperature },
            (None, Some(p)) => Sampling::TopP { p, temperature },
        };
        Sampler::Candle(LogitsProcessor::from_sampling(seed, sampling))
    }

    /// The next token, from a step's logits (`[vocabulary]`).
    pub fn sample(&mut self, logits: &Tensor) -> Result<u32> {
        match self {
            Sampler::Candle(candle) => candle.sample(logits),
            Sampler::Softmax {
                temperature,
                rng,
                weights,
            } => softmax(logits, *temperature, rng, weights),
        }
    }
}

/// A draw from the softmax of `logits / temperature`, its weights in
/// `weights`.
fn softmax(
    logits: &Tensor,
    temperature: f32,
    rng: &mut StdRng,
    weights: &mut Vec<(u32, f32)>,
) -> Result<u32> {
    let logits = logits.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let floor = max - CUTOFF * temperature;
    weights.clear();
    let (mut total, mut nan) = (0f32, false);
    for (id, &logit) in logits.iter().enumerate() {
        if logit >= floor {
            let w = ((logit - max) / temperature).exp();
            total += w;
            weights.push((id as u32, w));
        } else {
            nan |= logit.is_nan();
        }
    }
    if nan || !total.is_finite() || total <= 0.0 {
        return Err(candle_core::Error::Msg(
            "the logits give no distribution to draw from".into(),
        ));
    }
    let mut left = rng.random::<f32>() * total;
    for &(id, w) in weights.iter() {
        if left < w {
            return Ok(id);
        }
        left -= w;
    }
    // Rounding left a sliver past the last weight: the last token.
    Ok(weights.last().map_or(0, |(id, _)| *id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn it_draws_each_token_about_as_often_as_its_probability() {
        // Probabilities 0.5, 0.25, 0.125, 0.125 at temperature 1, and a
        // token too unlikely to draw.
        let logits = [0.0f32, -2f32.ln(), -4f32.ln(), -4f32.ln(), -80.0]
            .iter()
            .map(|l| l + 3.0)
            .collect::<Vec<_>>();
        let logits = Tensor::new(logits.as_slice(), &Device::Cpu).unwrap();
        let mut sampler = Sampler::new(7, 1.0, None, None);
        let mut counts = [0u32; 5];
        let draws = 40_000;
        for _ in 0..draws {
            counts[sampler.sample(&logits).unwrap() as usize] += 1;
        }
        for (count, p) in counts.iter().zip([0.5, 0.25, 0.125, 0.125, 0.0]) {
            let share = f64::from(*count) / f64::from(draws);
            assert!((share - p).abs() < 0.01, "{counts:?}");
        }
        // The same seed draws the same tokens.
        let mut a = Sampler::new(3, 0.8, None, None);
        let mut b = Sampler::new(3, 0.8, None, None);
        for _ in 0..50 {
            assert_eq!(a.sample(&logits).unwrap(), b.sample(&logits).unwrap());
        }
    }

    #[test]
    fn greedy_takes_the_largest_and_bad_logits_are_errors() {
        let logits = Tensor::new(&[0.1f32, 2.0, -1.0], &Device::Cpu).unwrap();
        let mut greedy = Sampler::new(1, 0.0, None, None);
        assert_eq!(greedy.sample(&logits).unwrap(), 1);
        let nan = Tensor::new(&[f32::NAN, f32::NAN], &Device::Cpu).unwrap();
        assert!(Sampler::new(1, 1.0, None, None).sample(&nan).is_err());
    }
}
