//! `{"$output": {"run": ID, "key": KEY}}` values: found anywhere in a run's
//! inputs, and written from `wfq enqueue --input k=@run:42/n9_images`.

use serde_json::{Value, json};

/// The member that marks an output reference.
pub const OUTPUT_MARKER: &str = "$output";

/// One reference to another run's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputRef {
    /// The run whose output is taken.
    pub run: i64,
    /// The key of its outputs.
    pub key: String,
}

impl OutputRef {
    /// The JSON value that stands for this reference in `inputs`.
    pub fn to_json(&self) -> Value {
        json!({ OUTPUT_MARKER: { "run": self.run, "key": self.key } })
    }

    /// Reads `value` as a reference: `None` when it is not one (no
    /// `$output` member, or not of the exact shape; the database's trigger
    /// refuses a malformed one at insert).
    pub fn of(value: &Value) -> Option<OutputRef> {
        let Value::Object(object) = value else {
            return None;
        };
        if object.len() != 1 {
            return None;
        }
        let Value::Object(reference) = object.get(OUTPUT_MARKER)? else {
            return None;
        };
        if reference.len() != 2 {
            return None;
        }
        let run = reference.get("run")?.as_i64()?;
        let key = reference.get("key")?.as_str()?;
        (run > 0 && !key.is_empty()).then(|| OutputRef {
            run,
            key: key.to_owned(),
        })
    }
}

/// Every reference in `inputs`, at any depth, in document order.
pub fn references(inputs: &Value) -> Vec<OutputRef> {
    fn walk(value: &Value, found: &mut Vec<OutputRef>) {
        if let Some(reference) = OutputRef::of(value) {
            found.push(reference);
            return;
        }
        match value {
            Value::Object(map) => map.values().for_each(|v| walk(v, found)),
            Value::Array(items) => items.iter().for_each(|v| walk(v, found)),
            _ => {}
        }
    }
    let mut found = Vec::new();
    walk(inputs, &mut found);
    found
}

/// Why an `@run:` input argument cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "--input {text:?}: {why} (expected KEY=@run:RUN_ID/OUTPUT_KEY, e.g. image=@run:42/n9_images)"
)]
pub struct RunInputError {
    /// The argument as given.
    pub text: String,
    /// What is wrong with it.
    pub why: &'static str,
}

/// Reads `KEY=@run:ID/OUTPUT_KEY` (another run's output as this input):
/// `Ok(None)` for any other `--input` (a value or a file).
pub fn parse_run_input(text: &str) -> Result<Option<(String, OutputRef)>, RunInputError> {
    let Some((key, value)) = text.split_once('=') else {
        return Ok(None);
    };
    let Some(reference) = value.strip_prefix("@run:") else {
        return Ok(None);
    };
    let bad = |why| RunInputError {
        text: text.to_owned(),
        why,
    };
    let key = key.trim();
    if key.is_empty() {
        return Err(bad("the input key is empty"));
    }
    let (run, output) = reference
        .split_once('/')
        .ok_or_else(|| bad("no /OUTPUT_KEY after the run id"))?;
    let run: i64 = run
        .trim()
        .parse()
        .ok()
        .filter(|id| *id > 0)
        .ok_or_else(|| bad("the run id is not a positive whole number"))?;
    if output.is_empty() {
        return Err(bad("the output key is empty"));
    }
    Ok(Some((
        key.to_owned(),
        OutputRef {
            run,
            key: output.to_owned(),
        },
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_found_at_any_depth_and_only_in_their_exact_shape() {
        let inputs = json!({
            "image": {"$output": {"run": 41, "key": "n9_images"}},
            "frames": [1, {"$output": {"run": 42, "key": "video"}}],
            "deep": {"a": {"b": {"$output": {"run": 43, "key": "audio"}}}},
            "not_one": {"$output": {"run": 44}},
            "extra_member": {"$output": {"run": 45, "key": "x"}, "y": 1},
            "zero": {"$output": {"run": 0, "key": "x"}},
            "text": "$output",
        });
        let mut found: Vec<(i64, String)> = references(&inputs)
            .into_iter()
            .map(|r| (r.run, r.key))
            .collect();
        found.sort();
        assert_eq!(
            found,
            vec![
                (41, "n9_images".to_owned()),
                (42, "video".to_owned()),
                (43, "audio".to_owned()),
            ]
        );
        assert!(references(&json!({"prompt": "a boat"})).is_empty());
    }

    #[test]
    fn a_reference_round_trips_through_json() {
        let r = OutputRef {
            run: 7,
            key: "n9_images".into(),
        };
        assert_eq!(OutputRef::of(&r.to_json()), Some(r));
    }

    #[test]
    fn run_inputs_from_the_command_line() {
        /// The argument, and what it reads as: (key, run, output) or an error's words.
        type Case<'a> = (&'a str, Result<Option<(&'a str, i64, &'a str)>, &'a str>);
        let cases: [Case; 9] = [
            (
                "image=@run:42/n9_images",
                Ok(Some(("image", 42, "n9_images"))),
            ),
            (" image =@run:7/a/b", Ok(Some(("image", 7, "a/b")))),
            ("image=@boat.png", Ok(None)),
            ("prompt=a boat", Ok(None)),
            ("no equals sign", Ok(None)),
            ("image=@run:42", Err("no /OUTPUT_KEY")),
            ("image=@run:x/k", Err("not a positive whole number")),
            ("image=@run:-1/k", Err("not a positive whole number")),
            ("=@run:1/k", Err("the input key is empty")),
        ];
        for (text, want) in cases {
            let got = parse_run_input(text);
            match (got, want) {
                (Ok(got), Ok(want)) => assert_eq!(
                    got.map(|(k, r)| (k, r.run, r.key)),
                    want.map(|(k, run, key)| (k.to_owned(), run, key.to_owned())),
                    "{text}"
                ),
                (Err(e), Err(says)) => {
                    let e = e.to_string();
                    assert!(e.contains(says) && e.contains("@run:RUN_ID"), "{text}: {e}");
                }
                (got, want) => panic!("{text}: got {got:?}, want {want:?}"),
            }
        }
    }
}
