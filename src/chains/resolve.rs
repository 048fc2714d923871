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
    /// How far the copies of its media outputs are (`wfq.runs.media_state`:
    /// NULL until the mirror looked at it, pending, done, failed, none).
    pub media_state: Option<String>,
    /// Seconds since it finished (database clock).
    pub finished_secs_ago: Option<f64>,
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
    /// A media file the run takes is being copied to the worker's store:
    /// the run goes on with the copy once it is there.
    #[error("{input}: the media output `{key}` of run {run} is being copied to the store")]
    MirrorPending {
        /// The dependency.
        run: i64,
        /// The output key.
        key: String,
        /// Where the reference is.
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

/// How a worker with a store treats media outputs: `stored` turns a
/// mirrored location into a path of its store (`None`: another store), and
/// a copy still being made is waited for until its run finished
/// `mirror_wait` ago (then the provider's URL is taken).
pub struct Store<'a> {
    /// A mirrored location as a path of this worker's store.
    pub stored: &'a dyn Fn(&str) -> Option<String>,
    /// How long after a dependency finished its copies are waited for.
    pub mirror_wait: std::time::Duration,
}

/// `inputs` with each `{"$output": ...}` value replaced by the output it
/// names. A top-level input that takes a media file the worker's store
/// holds a copy of gets that copy as `{"$file": <store path>}`, which the
/// upload step sends to the provider (once, recorded in `wfq.run_files`);
/// a copy still being made is waited for ([`Unresolved::MirrorPending`]).
/// Every other reference gets the output's value as the provider gave it
/// (a media output: the provider's URL); so do all of them without a
/// `store`.
pub fn resolve(
    inputs: &Value,
    dependencies: &[Dependency],
    store: Option<&Store<'_>>,
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
                match (output, store) {
                    (Value::String(url), Some(store)) if is_link(url) => {
                        match mirrored.and_then(Value::as_str).and_then(store.stored) {
                            Some(path) => json!({ FILE_MARKER: path }),
                            None if copy_on_its_way(by_id[&reference.run], store) => {
                                return Err(Unresolved::MirrorPending {
                                    run: reference.run,
                                    key: reference.key,
                                    input,
                                });
                            }
                            None => output.clone(),
                        }
                    }
                    (output, _) => output.clone(),
                }
            }
            None => nested(value, &by_id, &input)?,
        };
        out.insert(key.clone(), resolved);
    }
    Ok(Value::Object(out))
}

fn is_link(text: &str) -> bool {
    let lower = text.get(..8).unwrap_or(text).to_ascii_lowercase();
    lower.starts_with("https://") || lower.starts_with("http://")
}

/// The mirror has not finished with the dependency's files, and it
/// finished recently enough that it will.
fn copy_on_its_way(dependency: &Dependency, store: &Store<'_>) -> bool {
    matches!(dependency.media_state.as_deref(), None | Some("pending"))
        && dependency
            .finished_secs_ago
            .is_some_and(|ago| ago < store.mirror_wait.as_secs_f64())
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
            media_state: Some(if mirrored.is_some() { "done" } else { "none" }.into()),
            outputs: Some(outputs),
            mirrored_outputs: mirrored,
            finished_secs_ago: Some(1.0),
        }
    }

    fn in_store(location: &str) -> Option<String> {
        location.strip_prefix("file:///store/").map(str::to_owned)
    }

    const STORE: Store<'static> = Store {
        stored: &in_store,
        mirror_wait: std::time::Duration::from_secs(60),
    };

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
        let other_store = Store {
            stored: &|_| None,
            mirror_wait: STORE.mirror_wait,
        };
        let cases = [
            // A worker with the store: the copy, as a file to upload.
            (Some(&STORE), json!({"$file": "41/n9_images.png"})),
            // Another store, or none: the provider's URL.
            (Some(&other_store), json!(url)),
            (None, json!(url)),
        ];
        for (store, image_value) in cases {
            let got = resolve(&inputs, &[image.clone(), unmirrored.clone()], store).unwrap();
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
            media_state: None,
            finished_secs_ago: None,
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
            let e = resolve(&inputs, &deps, None).unwrap_err();
            assert_eq!(e.to_string(), says);
        }
    }

    #[test]
    fn inputs_without_references_are_unchanged() {
        let inputs = json!({"prompt": "x", "image": {"$file": "in/boat.png"}, "n": [1, 2]});
        assert_eq!(resolve(&inputs, &[], Some(&STORE)).unwrap(), inputs);
    }

    #[test]
    fn a_copy_on_its_way_is_waited_for_a_while_then_the_url_taken() {
        let url = "https://cdn.example/a.png";
        let inputs = json!({"image": {"$output": {"run": 1, "key": "img"}}, "caption": {"$output": {"run": 1, "key": "text"}}});
        let dependency = |media_state: Option<&str>, ago: f64| Dependency {
            media_state: media_state.map(str::to_owned),
            finished_secs_ago: Some(ago),
            ..succeeded(1, json!({"img": url, "text": "a boat"}), None)
        };
        let cases = [
            // Not looked at yet, or copying: wait, with the store.
            (
                dependency(None, 1.0),
                Some(&STORE),
                Err("inputs.image: the media output `img` of run 1 is being copied to the store"),
            ),
            (
                dependency(Some("pending"), 1.0),
                Some(&STORE),
                Err("inputs.image: the media output `img` of run 1 is being copied to the store"),
            ),
            // Too long since it finished: the URL.
            (dependency(Some("pending"), 600.0), Some(&STORE), Ok(url)),
            // The copy failed, or there is nothing to copy: the URL.
            (dependency(Some("failed"), 1.0), Some(&STORE), Ok(url)),
            (dependency(Some("none"), 1.0), Some(&STORE), Ok(url)),
            // No store: nothing to wait for.
            (dependency(None, 1.0), None, Ok(url)),
        ];
        for (dependency, store, want) in cases {
            let got = resolve(&inputs, std::slice::from_ref(&dependency), store);
            match want {
                Ok(image) => assert_eq!(
                    got.unwrap(),
                    json!({"image": image, "caption": "a boat"}),
                    "{dependency:?}"
                ),
                Err(says) => assert_eq!(got.unwrap_err().to_string(), says, "{dependency:?}"),
            }
        }
    }
}
