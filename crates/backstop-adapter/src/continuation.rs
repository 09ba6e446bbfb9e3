//! Text rules for finishing an answer another backend broke off: the
//! instruction a target without prefill gets, where an answer may end, and
//! how much of a continuation repeats what the client already has.

/// The instruction after the partial answer, for a target that cannot take
/// it as a prefill.
pub const CONTINUE_PROMPT: &str = "Your previous answer was cut off. Continue it exactly where \
it stopped, from the next word: do not repeat any of it, do not start over, and add no \
introduction.";

/// Whether text ends where an answer may: after a sentence, a line or a
/// closing bracket or quote, or with nothing said.
pub fn ends_a_thought(text: &str) -> bool {
    if text.ends_with('\n') {
        return true;
    }
    match text.trim_end_matches([' ', '\t']).chars().last() {
        None => true,
        Some(c) => ".!?:;)]}\"'`*…。！？」』".contains(c),
    }
}

/// Bytes of a continuation's start that repeat the end of `said`, or
/// `None` while it cannot yet tell: the continuation may still be
/// repeating the answer from its start. `finished` means no more will
/// come. Shorter matches than [`MIN_OVERLAP`] are taken as chance.
pub fn overlap(said: &str, start: &str, finished: bool) -> Option<usize> {
    let trimmed = start.trim_start();
    let lead = start.len() - trimmed.len();
    let said_core = said.trim();
    // Started over: cut the whole answer once it has come again.
    if !said_core.is_empty() && trimmed.starts_with(said_core) {
        return Some(lead + said_core.len());
    }
    if !finished && !trimmed.is_empty() && said_core.starts_with(trimmed) {
        return None;
    }
    let longest = (MIN_OVERLAP..=start.len().min(said.len()))
        .rev()
        .filter(|k| start.is_char_boundary(*k))
        .find(|k| said.ends_with(&start[..*k]));
    if let Some(k) = longest {
        return Some(k);
    }
    // The same with the whitespace at the seam set aside.
    let said_end = said.trim_end();
    (MIN_OVERLAP..=trimmed.len().min(said_end.len()))
        .rev()
        .filter(|k| trimmed.is_char_boundary(*k))
        .find(|k| said_end.ends_with(&trimmed[..*k]))
        .map(|k| lead + k)
        .or(Some(0))
}

/// Shortest repeat that is cut.
pub const MIN_OVERLAP: usize = 8;

#[cfg(test)]
mod tests;
