//! What the targets share: the invariant of a label value taken from a file or a process.

use llamaprobe::sources::identity::LABEL_MAX_CHARS;

/// A label value taken from a file or a traced process: at most `LABEL_MAX_CHARS` characters,
/// no control character, nothing around it to trim.
pub fn assert_label(value: &str) {
    assert!(
        value.chars().count() <= LABEL_MAX_CHARS,
        "label of {} characters: {value:?}",
        value.chars().count()
    );
    assert!(
        !value.chars().any(char::is_control),
        "label with a control character: {value:?}"
    );
    assert_eq!(value, value.trim(), "label with surrounding white space");
}
