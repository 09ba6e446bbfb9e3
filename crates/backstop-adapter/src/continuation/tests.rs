use super::*;

#[test]
fn a_sentence_line_or_bracket_ends_a_thought_and_a_word_does_not() {
    for text in [
        "",
        "Done.",
        "Why? ",
        "a list:\n",
        "f(x)",
        "«quoted»\"",
        "完了。",
    ] {
        assert!(ends_a_thought(text), "{text:?}");
    }
    for text in ["The answer is", "one, two,", "and then "] {
        assert!(!ends_a_thought(text), "{text:?}");
    }
}

#[test]
fn a_repeated_tail_is_cut_and_a_fresh_start_is_kept() {
    let said = "The quick brown fox jumps over";
    assert_eq!(
        overlap(said, "fox jumps over the lazy dog.", true),
        Some(14)
    );
    assert_eq!(overlap(said, " jumps over the lazy dog.", true), Some(11));
    assert_eq!(overlap(said, " the lazy dog.", true), Some(0));
    // A short chance match is not a repeat.
    assert_eq!(overlap("I said over", "over and out", true), Some(0));
}

#[test]
fn a_continuation_that_starts_over_is_cut_once_the_answer_came_again() {
    let said = "Paris is the capital of France and";
    assert_eq!(overlap(said, "Paris is the capital", false), None);
    let again = "Paris is the capital of France and its largest city.";
    assert_eq!(overlap(said, again, false), Some(said.len()));
    assert_eq!(&again[said.len()..], " its largest city.");
    // With the stream over, what came is kept.
    assert_eq!(overlap(said, "Paris is", true), Some(0));
}

#[test]
fn cuts_fall_on_character_boundaries() {
    let said = "Ça coûte très cher, énormément";
    let start = "très cher, énormément même.";
    let k = overlap(said, start, true).unwrap();
    assert_eq!(&start[k..], " même.");
}
