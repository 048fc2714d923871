//! The dependencies' outputs in place of the references, before a submit.

use std::collections::HashMap;

use serde_json::{Map, Value, json};

use super::references::OutputRef;
use crate::files::location::FILE_MARKER;

/// What a run's references need to know about one of its dependencies.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Dependency {
    /// `wfq.runs.id`.
    pub id: i64,
    /// Its state.
    pub state: String,
    /// Why it failed, if it did.
    pub error_code: Option<String>,
    /// The provider's outputs.
    pub outputs: Option<Value>,
    /// The outputs with the stored copies of media files in place of the
    /// provider's URLs (`wfq.mirrored_outputs`), when mirrored.
    pub mirrored_outputs: Option<Value>,
}

/// Why the references of a run cannot be resolved now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unresolved {
    /// A dependency has not succeeded yet (the run was made due by hand:
    /// a chained run is released only when all its dependencies succeeded).
    #[error("run {run}, which this run depends on, is {state}, not succeeded yet")]
    NotFinished {
        /// The dependency.
        run: i64,
        /// Its state.
        state: String,
    },
    /// A dependency failed or was canceled.
    #[error("run {run}, which this run depends on, {state}{}", code.as_ref().map(|c| format!(" ({c})")).unwrap_or_default())]
    Failed {
        /// The dependency.
        run: i64,
        /// failed or canceled.
        state: String,
        /// Its error code.
        code: Option<String>,
    },
    /// A referenced run is gone (deleted since).
    #[error("{input}: run {run} does not exist")]
    MissingRun {
        /// The run named.
        run: i64,
        /// Where the reference is (`inputs.image`).
        input: String,
    },
    /// A succeeded dependency has no such output.
    #[error("{input}: run {run} succeeded without an output `{key}`")]
    MissingKey {
        /// The dependency.
        run: i64,
        /// The output key named.
        key: String,
        /// Where the reference is.
        input: String,
    },
}

/// `inputs` with each `{"$output": ...}` value replaced by the output it
/// names. A top-level input that takes a media file the worker's store
/// holds a copy of gets that copy as `{"$file": <store path>}`, which the
/// upload step sends to the provider (once, recorded in `wfq.run_files`);
/// every other reference gets the output's value as the provider gave it
/// (a media output: the provider's URL). `stored` turns a mirrored
/// location into a path of this worker's store (`None`: no store, or
/// another one).
pub fn resolve(
    inputs: &Value,
    dependencies: &[Dependency],
    stored: impl Fn(&str) -> Option<String>,
) -> Result<Value, Unresolved> {
    let by_id: HashMap<i64, &Dependency> = dependencies.iter().map(|d| (d.id, d)).collect();
    let Value::Object(top) = inputs else {
        return Ok(inputs.clone());
    };
    let mut out = Map::new();
    for (key, value) in top {
        let input = format!("inputs.{key}");
        let resolved = match OutputRef::of(value) {
            Some(reference) => {
                let (output, mirrored) = output_of(&by_id, &reference, &input)?;
                match (output, mirrored.and_then(|m| m.as_str()).and_then(&stored)) {
                    (Value::String(_), Some(path)) => json!({ FILE_MARKER: path }),
                    (output, _) => output.clone(),
                }
            }
            None => nested(value, &by_id, &input)?,
        };
        out.insert(key.clone(), resolved);
    }
    Ok(Value::Object(out))
}

fn nested(value: &Value, by_id: &HashMap<i64, &Dependency>, at: &str) -> Result<Value, Unresolved> {
    if let Some(reference) = OutputRef::of(value) {
        return Ok(output_of(by_id, &reference, at)?.0.clone());
    }
    Ok(match value {
        Value::Object(map) => {
            let mut out = Map::new();
            for (k, v) in map {
                out.insert(k.clone(), nested(v, by_id, &format!("{at}.{k}"))?);
            }
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(
            items
                .iter()
                .enumerate()
                .map(|(i, v)| nested(v, by_id, &format!("{at}.{i}")))
                .collect::<Result<_, _>>()?,
        ),
        other => other.clone(),
    })
}

/// The output a reference names, and its mirrored copy when there is one
/// (a stored location that is not the provider's URL).
fn output_of<'a>(
    by_id: &HashMap<i64, &'a Dependency>,
    reference: &OutputRef,
    input: &str,
) -> Result<(&'a Value, Option<&'a Value>), Unresolved> {
    let Some(dependency) = by_id.get(&reference.run) else {
        return Err(Unresolved::MissingRun {
            run: reference.run,
            input: input.to_owned(),
        });
    };
    match dependency.state.as_str() {
        "succeeded" => {}
        "failed" | "canceled" => {
            return Err(Unresolved::Failed {
                run: dependency.id,
                state: dependency.state.clone(),
                code: dependency.error_code.clone(),
            });
        }
        other => {
            return Err(Unresolved::NotFinished {
                run: dependency.id,
                state: other.to_owned(),
            });
        }
    }
    let output = dependency
        .outputs
        .as_ref()
        .and_then(|o| o.get(&reference.key))
        .ok_or_else(|| Unresolved::MissingKey {
            run: dependency.id,
            key: reference.key.clone(),
            input: input.to_owned(),
        })?;
    let mirrored = dependency
        .mirrored_outputs
        .as_ref()
        .and_then(|m| m.get(&reference.key))
        .filter(|m| !m.is_null() && *m != output);
    Ok((output, mirrored))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn succeeded(id: i64, outputs: Value, mirrored: Option<Value>) -> Dependency {
        Dependency {
            id,
            state: "succeeded".into(),
            error_code: None,
            outputs: Some(outputs),
            mirrored_outputs: mirrored,
        }
    }

    fn store(location: &str) -> Option<String> {
        location.strip_prefix("file:///store/").map(str::to_owned)
    }

    #[test]
    fn references_become_outputs_and_mirrored_media_a_stored_file() {
        let url = "https://cdn.example/wfrun_1/n9_images.png";
        let image = succeeded(
            41,
            json!({"n9_images": url, "seed": 7, "frames": [url]}),
            Some(
                json!({"n9_images": "file:///store/41/n9_images.png", "seed": 7, "frames": ["file:///store/41/f0.png"]}),
            ),
        );
        let unmirrored = succeeded(
            42,
            json!({"text": "a caption", "video": "https://v/1.mp4"}),
            None,
        );
        let inputs = json!({
            "prompt": "a paper boat",
            "image": {"$output": {"run": 41, "key": "n9_images"}},
            "seed": {"$output": {"run": 41, "key": "seed"}},
            "frames": {"$output": {"run": 41, "key": "frames"}},
            "video": {"$output": {"run": 42, "key": "video"}},
            "meta": {"caption": {"$output": {"run": 42, "key": "text"}}, "more": [{"$output": {"run": 41, "key": "n9_images"}}]},
        });
        let cases = [
            // A worker with the store: the copy, as a file to upload.
            (
                &store as &dyn Fn(&str) -> Option<String>,
                json!({"$file": "41/n9_images.png"}),
            ),
            // No store (or another one): the provider's URL.
            (&|_: &str| None, json!(url)),
        ];
        for (stored, image_value) in cases {
            let got = resolve(&inputs, &[image.clone(), unmirrored.clone()], stored).unwrap();
            assert_eq!(
                got,
                json!({
                    "prompt": "a paper boat",
                    "image": image_value,
                    "seed": 7,
                    // A list is passed as the provider gave it (a file
                    // input is one file).
                    "frames": [url],
                    "video": "https://v/1.mp4",
                    // Nested references take the value as is.
                    "meta": {"caption": "a caption", "more": [url]},
                })
            );
        }
    }

    #[test]
    fn what_cannot_be_resolved_is_named() {
        let inputs = |run: i64, key: &str| json!({"image": {"$output": {"run": run, "key": key}}});
        let running = Dependency {
            id: 2,
            state: "running".into(),
            error_code: None,
            outputs: None,
            mirrored_outputs: None,
        };
        let failed = Dependency {
            id: 3,
            state: "failed".into(),
            error_code: Some("ENGINE_EXECUTION_FAILED".into()),
            ..running.clone()
        };
        let deps = [
            succeeded(1, json!({"n9_images": "https://x/a.png"}), None),
            running,
            failed,
        ];
        let cases = [
            (
                inputs(1, "video"),
                "inputs.image: run 1 succeeded without an output `video`",
            ),
            (
                inputs(2, "x"),
                "run 2, which this run depends on, is running, not succeeded yet",
            ),
            (
                inputs(3, "x"),
                "run 3, which this run depends on, failed (ENGINE_EXECUTION_FAILED)",
            ),
            (inputs(9, "x"), "inputs.image: run 9 does not exist"),
            (
                json!({"a": [{"b": {"$output": {"run": 1, "key": "nope"}}}]}),
                "inputs.a.0.b: run 1 succeeded without an output `nope`",
            ),
        ];
        for (inputs, says) in cases {
            let e = resolve(&inputs, &deps, |_| None).unwrap_err();
            assert_eq!(e.to_string(), says);
        }
    }

    #[test]
    fn inputs_without_references_are_unchanged() {
        let inputs = json!({"prompt": "x", "image": {"$file": "in/boat.png"}, "n": [1, 2]});
        assert_eq!(resolve(&inputs, &[], |_| None).unwrap(), inputs);
    }
}
