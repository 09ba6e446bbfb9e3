use super::*;

fn stops(s: &[&str]) -> Vec<String> {
    s.iter().map(|s| s.to_string()).collect()
}

#[test]
fn text_before_a_stop_string_is_sent_and_the_stop_is_not() {
    assert_eq!(sendable("Hello END there", &stops(&["END"])), (6, true));
    assert_eq!(sendable("a\n\nb", &stops(&["x", "\n\n"])), (1, true));
}

#[test]
fn a_tail_that_may_become_a_stop_string_is_held_back() {
    assert_eq!(sendable("Hello EN", &stops(&["END"])), (6, false));
    assert_eq!(sendable("Hello E", &stops(&["END"])), (6, false));
    assert_eq!(sendable("Hello", &stops(&["END"])), (5, false));
    assert_eq!(sendable("Hello", &[]), (5, false));
}

#[test]
fn an_unfinished_character_is_held_back() {
    assert_eq!(sendable("ok \u{FFFD}", &[]), (3, false));
    // A stop string whose first character is multibyte.
    assert_eq!(sendable("x é", &stops(&["éa"])), (2, false));
}
