//! Checks a run's `inputs` against the workflow's parameter manifest before
//! anything is sent, and completes them with the manifest's defaults.
//!
//! A run that fails here is never submitted, so it is never charged.

use serde_json::{Map, Value};

use crate::providers::{Manifest, ParamKind};

/// The largest `inputs` object wfq submits, as serialized JSON. Media belong
/// in URLs or uploaded assets, not inline; a row this large is a mistake.
pub const MAX_INPUT_BYTES: usize = 256 * 1024;

/// Why a run's inputs cannot be submitted. Every variant names the key.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InputError {
    /// The whole object is too large to send.
    #[error(
        "inputs: {bytes} bytes of JSON exceed the limit of {limit} bytes (pass media as URLs or asset:// URIs)"
    )]
    TooLarge {
        /// Its serialized size.
        bytes: usize,
        /// The limit.
        limit: usize,
    },
    /// A key the workflow does not have.
    #[error("inputs.{key}: unknown key; the workflow accepts: {}", valid.join(", "))]
    UnknownKey {
        /// The offending key.
        key: String,
        /// Every key the manifest lists.
        valid: Vec<String>,
    },
    /// A required key without a value and without a default.
    #[error("inputs.{key}: required and missing (the workflow has no default for it)")]
    Missing {
        /// The missing key.
        key: String,
    },
    /// A value of the wrong type.
    #[error("inputs.{key}: expected {expected}, got {got}")]
    WrongType {
        /// The offending key.
        key: String,
        /// What the manifest asks for.
        expected: String,
        /// What was given, e.g. `string \"abc\"`.
        got: String,
    },
}

/// The inputs to send: the producer's values plus the defaults they left out.
pub fn complete_inputs(
    manifest: &Manifest,
    inputs: &Map<String, Value>,
) -> Result<Map<String, Value>, InputError> {
    check_size(inputs)?;
    let known = |key: &str| manifest.parameters.iter().any(|p| p.key == key);
    // Unknown keys first: a typo is the likeliest mistake and the list of
    // valid keys is the most useful answer to it.
    if let Some(key) = inputs.keys().find(|k| !known(k)) {
        return Err(InputError::UnknownKey {
            key: key.clone(),
            valid: manifest.parameters.iter().map(|p| p.key.clone()).collect(),
        });
    }
    let mut sent = Map::new();
    for parameter in &manifest.parameters {
        let value = match inputs.get(&parameter.key) {
            Some(Value::Null) | None => match &parameter.default_value {
                Some(default) => default.clone(),
                None if parameter.required => {
                    return Err(InputError::Missing {
                        key: parameter.key.clone(),
                    });
                }
                None => continue,
            },
            Some(value) => {
                check_type(&parameter.key, &parameter.kind, value)?;
                check_length(parameter, value)?;
                value.clone()
            }
        };
        sent.insert(parameter.key.clone(), value);
    }
    Ok(sent)
}

/// Refuses an `inputs` object larger than [`MAX_INPUT_BYTES`].
pub fn check_size(inputs: &Map<String, Value>) -> Result<(), InputError> {
    let bytes = serde_json::to_vec(inputs).map_or(usize::MAX, |v| v.len());
    if bytes > MAX_INPUT_BYTES {
        return Err(InputError::TooLarge {
            bytes,
            limit: MAX_INPUT_BYTES,
        });
    }
    Ok(())
}

fn check_type(key: &str, kind: &ParamKind, value: &Value) -> Result<(), InputError> {
    let ok = match kind {
        ParamKind::String => value.is_string(),
        ParamKind::Int => value.is_i64() || value.is_u64(),
        ParamKind::Float => value.is_number(),
        ParamKind::Bool => value.is_boolean(),
        ParamKind::Media(_) => value.as_str().is_some_and(is_media_reference),
        ParamKind::Choice(options) => value
            .as_str()
            .is_some_and(|v| options.iter().any(|o| o == v)),
        ParamKind::Other(_) => true,
    };
    if ok {
        return Ok(());
    }
    let expected = match kind {
        ParamKind::String => "a string".to_owned(),
        ParamKind::Int => "an integer".to_owned(),
        ParamKind::Float => "a number".to_owned(),
        ParamKind::Bool => "true or false".to_owned(),
        ParamKind::Media(media) => format!("{media} as an http(s) URL or an asset:// URI"),
        ParamKind::Choice(options) => format!("one of {}", options.join(", ")),
        ParamKind::Other(other) => other.clone(),
    };
    Err(InputError::WrongType {
        key: key.to_owned(),
        expected,
        got: describe(value),
    })
}

fn check_length(parameter: &crate::providers::Parameter, value: &Value) -> Result<(), InputError> {
    let (Some(max), Some(text)) = (parameter.max_chars, value.as_str()) else {
        return Ok(());
    };
    let chars = text.chars().count();
    if chars <= max {
        return Ok(());
    }
    Err(InputError::WrongType {
        key: parameter.key.clone(),
        expected: format!("at most {max} characters"),
        got: format!("{chars} characters"),
    })
}

fn is_media_reference(text: &str) -> bool {
    let rest = |prefix: &str| text.strip_prefix(prefix).is_some_and(|r| !r.is_empty());
    rest("https://") || rest("http://") || rest("asset://")
}

fn describe(value: &Value) -> String {
    let mut shown = value.to_string();
    if shown.chars().count() > 60 {
        shown = shown.chars().take(60).collect::<String>() + "…";
    }
    let kind = match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a fractional number",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    };
    format!("{kind} {shown}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::Parameter;
    use serde_json::json;

    fn manifest() -> Manifest {
        let p = |key: &str, kind: &str, required: bool, default: Option<Value>| Parameter {
            key: key.into(),
            kind: ParamKind::parse(kind),
            required,
            default_value: default,
            max_chars: None,
        };
        Manifest {
            workflow_id: "wf".into(),
            revision_id: Some("wfr".into()),
            currency: None,
            quote_amount: None,
            may_incur_external_cost: false,
            output_types: Vec::new(),
            parameters: vec![
                p("prompt", "string", true, None),
                p("seed", "int", true, Some(json!(7))),
                p("scale", "float", false, None),
                p("hd", "bool", false, Some(json!(false))),
                p("image", "image", false, None),
                p("exotic", "matrix", false, None),
                Parameter {
                    kind: ParamKind::Choice(vec!["formal".into(), "casual".into()]),
                    max_chars: None,
                    ..p("tone", "string", false, None)
                },
                Parameter {
                    max_chars: Some(5),
                    ..p("title", "string", false, None)
                },
            ],
        }
    }

    fn check(inputs: Value) -> Result<Map<String, Value>, InputError> {
        complete_inputs(&manifest(), inputs.as_object().unwrap())
    }

    #[test]
    fn defaults_fill_what_the_producer_left_out() {
        let sent = check(json!({"prompt": "a bottle"})).unwrap();
        assert_eq!(
            Value::Object(sent),
            json!({"prompt": "a bottle", "seed": 7, "hd": false})
        );
    }

    #[test]
    fn valid_values_of_every_type_pass_unchanged() {
        let inputs = json!({"prompt": "p", "seed": 156680208700286u64, "scale": 7, "hd": true,
            "image": "asset://sim/demo-image", "exotic": [[1, 2]], "tone": "casual", "title": "héllo"});
        let sent = check(inputs.clone()).unwrap();
        assert_eq!(Value::Object(sent), inputs);
        assert!(check(json!({"prompt": "p", "scale": 0.5, "image": "https://x/y.png"})).is_ok());
    }

    #[test]
    fn each_bad_input_is_named_in_the_error() {
        let table = [
            (
                json!({"prompt": "p", "sede": 1}),
                "inputs.sede: unknown key; the workflow accepts: prompt, seed, scale, hd, image, exotic, tone, title",
            ),
            (
                json!({}),
                "inputs.prompt: required and missing (the workflow has no default for it)",
            ),
            (
                json!({"prompt": null}),
                "inputs.prompt: required and missing (the workflow has no default for it)",
            ),
            (
                json!({"prompt": 5}),
                "inputs.prompt: expected a string, got a number 5",
            ),
            (
                json!({"prompt": "p", "seed": "42"}),
                "inputs.seed: expected an integer, got a string \"42\"",
            ),
            (
                json!({"prompt": "p", "seed": 4.5}),
                "inputs.seed: expected an integer, got a fractional number 4.5",
            ),
            (
                json!({"prompt": "p", "scale": "big"}),
                "inputs.scale: expected a number, got a string \"big\"",
            ),
            (
                json!({"prompt": "p", "hd": "yes"}),
                "inputs.hd: expected true or false, got a string \"yes\"",
            ),
            (
                json!({"prompt": "p", "image": "/tmp/cat.png"}),
                "inputs.image: expected image as an http(s) URL or an asset:// URI, got a string \"/tmp/cat.png\"",
            ),
            (
                json!({"prompt": "p", "tone": "rude"}),
                "inputs.tone: expected one of formal, casual, got a string \"rude\"",
            ),
            (
                json!({"prompt": "p", "title": "é12345"}),
                "inputs.title: expected at most 5 characters, got 6 characters",
            ),
            (
                json!({"prompt": "p", "image": "asset://"}),
                "inputs.image: expected image as an http(s) URL or an asset:// URI, got a string \"asset://\"",
            ),
        ];
        for (inputs, message) in table {
            let err = check(inputs.clone()).expect_err(&inputs.to_string());
            assert_eq!(err.to_string(), message, "{inputs}");
        }
    }
}
