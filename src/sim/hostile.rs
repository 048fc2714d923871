//! Hostile answers (`Faults::hostile_outputs`): JSON that is syntactically
//! valid, as a careless or hostile server may send it, but that naive
//! clients choke on.
//!
//! Finished runs' outputs and failed runs' error messages carry one entry
//! of this corpus, cycling per run in creation order (the first run of each
//! API gets the first entry):
//!
//! 0. `Nul`: a NUL character (`\u0000`) inside a string.
//! 1. `LoneSurrogate`: a lone UTF-16 surrogate escape (`"\ud800"`), which
//!    is no Unicode scalar value at all.
//! 2. `Huge`: a 2 MiB string.
//! 3. `Deep`: values nested 200 levels deep (deeper than serde_json's
//!    default limit of 128).
//! 4. `NulKey`: an object key containing `\u0000`.
//! 5. `OddNumbers`: `1e400` (beyond f64), `-0`,
//!    `123456789012345678901234567890` (beyond u64/i64) and `1.0e-400`
//!    (below the smallest f64).
//! 6. `ControlEscapes`: control characters escaped oddly: `\u0001`, an
//!    upper-case `\u001F`, `\b`, `\f`, an escaped solidus `\/`, `\u000A`
//!    for a newline, `\u007f`, plus a raw DEL and a raw U+2028 (both legal
//!    unescaped).
//! 7. `Everything`: all of the above at once.
//!
//! Outputs keep their real members and gain one more, `sim_hostile`, whose
//! value is the entry. Error messages stay strings: the entry's text is
//! appended (the structural entries as text: 200 nested brackets, the
//! numbers as written, the key with its NUL). Money fields are never
//! touched, so ledgers still match.
//!
//! serde_json refuses to produce most of this, so answers are built with
//! marks in place (`mark_outputs`, `mark_message`) and the serialized text
//! is then spliced (`splice`).

use serde_json::Value;

/// The member added to hostile outputs.
pub(crate) const OUTPUTS_MEMBER: &str = "sim_hostile";

/// Placeholders that serde_json can write; `splice` replaces them.
const OUTPUTS_MARK: &str = "\u{1}sim-hostile-outputs\u{1}";
const MESSAGE_MARK: &str = "\u{1}sim-hostile-message\u{1}";

/// Length of the `Huge` string.
const HUGE_LEN: usize = 2 * 1024 * 1024;

/// How deep `Deep` nests.
const DEPTH: usize = 200;

/// One entry of the corpus (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Variant {
    Nul,
    LoneSurrogate,
    Huge,
    Deep,
    NulKey,
    OddNumbers,
    ControlEscapes,
    Everything,
}

const CORPUS: [Variant; 8] = [
    Variant::Nul,
    Variant::LoneSurrogate,
    Variant::Huge,
    Variant::Deep,
    Variant::NulKey,
    Variant::OddNumbers,
    Variant::ControlEscapes,
    Variant::Everything,
];

/// The odd numbers, as written on the wire.
const ODD_NUMBERS: &str = r#"{"beyond_f64":1e400,"negative_zero":-0,"beyond_i64":123456789012345678901234567890,"below_f64":1.0e-400}"#;

/// Control characters escaped oddly, as string-body text. The DEL and
/// U+2028 are raw: JSON allows both unescaped.
const CONTROL_ESCAPES: &str = "\\u0001\\u001F\\b\\f\\/\\u000A\\u007f\u{7f}\u{2028}";

impl Variant {
    /// The entry for the run created `order`-th (from 1) by its API.
    pub(crate) fn of_run(order: u64) -> Variant {
        let index = order.saturating_sub(1) % CORPUS.len() as u64;
        CORPUS[index as usize]
    }

    /// The value of `sim_hostile` in outputs, as JSON text.
    fn outputs_fragment(self) -> String {
        match self {
            Variant::Nul => r#""before\u0000after""#.to_owned(),
            Variant::LoneSurrogate => r#""\ud800""#.to_owned(),
            Variant::Huge => format!("\"{}\"", "x".repeat(HUGE_LEN)),
            Variant::Deep => format!("{}\"bottom\"{}", "{\"n\":".repeat(DEPTH), "}".repeat(DEPTH)),
            Variant::NulKey => r#"{"key\u0000with a nul":true}"#.to_owned(),
            Variant::OddNumbers => ODD_NUMBERS.to_owned(),
            Variant::ControlEscapes => format!("\"{CONTROL_ESCAPES}\""),
            Variant::Everything => {
                let members: Vec<String> = CORPUS[..CORPUS.len() - 1]
                    .iter()
                    .map(|v| format!("\"{}\":{}", v.name(), v.outputs_fragment()))
                    .collect();
                format!("{{{}}}", members.join(","))
            }
        }
    }

    /// Text appended inside an error message string (string-body escapes).
    fn message_suffix(self) -> String {
        match self {
            Variant::Nul => " (nul: \\u0000)".to_owned(),
            Variant::LoneSurrogate => " (surrogate: \\ud800)".to_owned(),
            Variant::Huge => format!(" {}", "x".repeat(HUGE_LEN)),
            Variant::Deep => format!(" {}{}", "[".repeat(DEPTH), "]".repeat(DEPTH)),
            Variant::NulKey => " (key\\u0000with a nul)".to_owned(),
            Variant::OddNumbers => " 1e400 -0 123456789012345678901234567890 1.0e-400".to_owned(),
            Variant::ControlEscapes => format!(" {CONTROL_ESCAPES}"),
            Variant::Everything => CORPUS[..CORPUS.len() - 1]
                .iter()
                .map(|v| v.message_suffix())
                .collect(),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Variant::Nul => "nul",
            Variant::LoneSurrogate => "lone_surrogate",
            Variant::Huge => "huge",
            Variant::Deep => "deep",
            Variant::NulKey => "nul_key",
            Variant::OddNumbers => "odd_numbers",
            Variant::ControlEscapes => "control_escapes",
            Variant::Everything => "everything",
        }
    }
}

/// Outputs with the hostile member's mark added (non-objects are left
/// alone: every simulated output is an object).
pub(crate) fn mark_outputs(mut outputs: Value) -> Value {
    if let Value::Object(map) = &mut outputs {
        map.insert(
            OUTPUTS_MEMBER.to_owned(),
            Value::String(OUTPUTS_MARK.to_owned()),
        );
    }
    outputs
}

/// A message with the mark for its hostile suffix.
pub(crate) fn mark_message(message: &str) -> String {
    format!("{message}{MESSAGE_MARK}")
}

/// Replaces the marks in serialized `json` with `variant`'s text.
pub(crate) fn splice(json: &str, variant: Variant) -> String {
    // As serde_json writes them: control characters become `\u0001`.
    let outputs_mark = serde_json::to_string(OUTPUTS_MARK).unwrap_or_default();
    let message_mark = serde_json::to_string(MESSAGE_MARK).unwrap_or_default();
    let message_mark = message_mark.trim_matches('"');
    let mut text = json.to_owned();
    if text.contains(&outputs_mark) {
        text = text.replace(&outputs_mark, &variant.outputs_fragment());
    }
    if text.contains(message_mark) {
        text = text.replace(message_mark, &variant.message_suffix());
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Syntax only: serde_json's "ignore" path checks the grammar without a
    /// depth limit, number ranges or surrogate pairing.
    fn valid(text: &str) -> bool {
        serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok()
    }

    fn spliced(variant: Variant) -> String {
        let body = json!({
            "outputs": mark_outputs(json!({"text": "ok"})),
            "error": mark_message("engine failed"),
            "final_amount": "0.01000000",
        });
        splice(&body.to_string(), variant)
    }

    #[test]
    fn every_entry_is_valid_json_that_strict_parsers_refuse_or_mangle() {
        for (i, variant) in CORPUS.into_iter().enumerate() {
            assert_eq!(Variant::of_run(i as u64 + 1), variant);
            let text = spliced(variant);
            assert!(valid(&text), "{variant:?} is not valid JSON");
            assert!(!text.contains("sim-hostile"), "{variant:?}: a mark is left");
            assert!(
                text.contains(r#""final_amount":"0.01000000""#),
                "money intact"
            );
            assert!(text.contains(r#""text":"ok""#), "real outputs kept");
        }
        assert_eq!(Variant::of_run(9), Variant::Nul, "cycles");
        assert!(serde_json::from_str::<Value>(&spliced(Variant::LoneSurrogate)).is_err());
        assert!(serde_json::from_str::<Value>(&spliced(Variant::Deep)).is_err());
        assert!(serde_json::from_str::<Value>(&spliced(Variant::OddNumbers)).is_err());
        let nul: Value = serde_json::from_str(&spliced(Variant::Nul)).expect("parses");
        assert_eq!(nul["outputs"][OUTPUTS_MEMBER], "before\u{0}after");
        assert_eq!(nul["error"], "engine failed (nul: \u{0})");
        let huge = spliced(Variant::Huge);
        assert!(huge.len() > 2 * HUGE_LEN);
        let key: Value = serde_json::from_str(&spliced(Variant::NulKey)).expect("parses");
        assert_eq!(key["outputs"][OUTPUTS_MEMBER]["key\u{0}with a nul"], true);
        let control: Value =
            serde_json::from_str(&spliced(Variant::ControlEscapes)).expect("parses");
        assert_eq!(
            control["outputs"][OUTPUTS_MEMBER],
            "\u{1}\u{1f}\u{8}\u{c}/\n\u{7f}\u{7f}\u{2028}"
        );
        let all = spliced(Variant::Everything);
        for needle in [r"\u0000", r"\ud800", "1e400", r"\u001F", "bottom"] {
            assert!(all.contains(needle), "{needle}");
        }
    }

    #[test]
    fn nothing_changes_without_marks() {
        let text = json!({"outputs": {"a": 1}, "error": "e"}).to_string();
        assert_eq!(splice(&text, Variant::Everything), text);
    }
}
