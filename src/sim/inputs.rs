//! Validation of submitted `inputs` against a workflow's manifest.
//!
//! Each rejection names the offending key in its detail, in the style of the
//! documented error ("input n4_video must be an uploaded file URL or file id").

use serde_json::{Map, Value};

use super::catalog::{ValueType, Workflow};

/// The one optional flag Seedance workflows take outside their manifest.
const REAL_PERSON_FLAG: &str = "contains_real_person_material";

/// Asset URIs the simulator pretends were uploaded through `POST /assets`.
const KNOWN_ASSET_PREFIX: &str = "asset://sim/";

/// Checks `inputs` (absent means `{}`) against `wf`'s manifest. The error is
/// the human-readable detail for `INVALID_WORKFLOW_INPUT`.
pub(crate) fn validate(wf: &Workflow, inputs: Option<&Value>) -> Result<(), String> {
    let empty = Map::new();
    let map = match inputs {
        None | Some(Value::Null) => &empty,
        Some(Value::Object(map)) => map,
        Some(_) => return Err("inputs must be a JSON object".to_owned()),
    };
    // Sorted so that the same bad request always reports the same key,
    // whether or not serde_json preserves insertion order.
    let mut entries: Vec<(&String, &Value)> = map.iter().collect();
    entries.sort_by_key(|(key, _)| *key);
    for (key, value) in entries {
        if wf.accepts_real_person_flag && key == REAL_PERSON_FLAG {
            if !value.is_boolean() {
                return Err(format!("input {key} must be a bool"));
            }
            continue;
        }
        let Some(param) = wf.param(key) else {
            return Err(format!("input {key} is not a parameter of this workflow"));
        };
        check_type(key, param.ty, value)?;
    }
    for param in wf.params {
        if param.required && param.default.is_none() && !map.contains_key(param.key) {
            return Err(format!("input {} is required", param.key));
        }
    }
    Ok(())
}

fn check_type(key: &str, ty: ValueType, value: &Value) -> Result<(), String> {
    let ok = match ty {
        ValueType::String => value.is_string(),
        // An integer in JSON, not "5" and not 5.0: the engine is strict.
        ValueType::Int => value.is_i64() || value.is_u64(),
        ValueType::Float => value.is_number(),
        ValueType::Bool => value.is_boolean(),
        ValueType::Image | ValueType::Video | ValueType::Audio => {
            return check_media(key, value);
        }
    };
    if ok {
        Ok(())
    } else {
        Err(format!("input {key} must be of type {}", ty.as_str()))
    }
}

/// Media inputs are an http(s) URL or the URI of an uploaded asset.
fn check_media(key: &str, value: &Value) -> Result<(), String> {
    let text = value.as_str().unwrap_or_default().trim();
    let is_url = ["http://", "https://"]
        .iter()
        .any(|scheme| text.len() > scheme.len() && starts_with_ignore_case(text, scheme));
    let is_known_asset =
        text.len() > KNOWN_ASSET_PREFIX.len() && text.starts_with(KNOWN_ASSET_PREFIX);
    if is_url || is_known_asset {
        Ok(())
    } else {
        Err(format!(
            "input {key} must be an uploaded file URL or file id"
        ))
    }
}

fn starts_with_ignore_case(text: &str, prefix: &str) -> bool {
    text.get(..prefix.len())
        .is_some_and(|head| head.eq_ignore_ascii_case(prefix))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::catalog::find;
    use serde_json::json;

    #[test]
    fn validation_table() {
        let img = find("wf_861ef31e94dcfb10e6e7").expect("catalog");
        let vid = find("wf_seedance_video_2f0c").expect("catalog");
        let dub = find("wf_audio_dub_7c21").expect("catalog");
        // (workflow, inputs, Ok or the key the error must name)
        let table: &[(&Workflow, Value, Result<(), &str>)] = &[
            (img, json!({}), Ok(())),
            (img, Value::Null, Ok(())),
            (img, json!({"n6_text": "a", "n3_seed": 1}), Ok(())),
            (img, json!({"n3_seed": "1"}), Err("n3_seed")),
            (img, json!({"n3_seed": 1.5}), Err("n3_seed")),
            (img, json!({"n6_text": 3}), Err("n6_text")),
            (img, json!({"bogus": 1}), Err("bogus")),
            (img, json!(["n6_text"]), Err("inputs")),
            (vid, json!({}), Err("prompt")),
            (vid, json!({"prompt": "p"}), Ok(())),
            (
                vid,
                json!({"prompt": "p", "guidance": 7, "duration": 10, "watermark": true}),
                Ok(()),
            ),
            (
                vid,
                json!({"prompt": "p", "guidance": "7"}),
                Err("guidance"),
            ),
            (
                vid,
                json!({"prompt": "p", "watermark": 0}),
                Err("watermark"),
            ),
            (
                vid,
                json!({"prompt": "p", "duration": 5.0}),
                Err("duration"),
            ),
            (
                vid,
                json!({"prompt": "p", "image": "https://x.test/a.png"}),
                Ok(()),
            ),
            (
                vid,
                json!({"prompt": "p", "image": "HTTP://x.test/a.png"}),
                Ok(()),
            ),
            (
                vid,
                json!({"prompt": "p", "image": "asset://sim/demo-image"}),
                Ok(()),
            ),
            (
                vid,
                json!({"prompt": "p", "image": "asset://other/x"}),
                Err("image"),
            ),
            (
                vid,
                json!({"prompt": "p", "image": "asset://sim/"}),
                Err("image"),
            ),
            (
                vid,
                json!({"prompt": "p", "image": "/tmp/a.png"}),
                Err("image"),
            ),
            (vid, json!({"prompt": "p", "image": 1}), Err("image")),
            (
                vid,
                json!({"prompt": "p", "contains_real_person_material": true}),
                Ok(()),
            ),
            (
                vid,
                json!({"prompt": "p", "contains_real_person_material": "yes"}),
                Err("contains_real_person_material"),
            ),
            (
                img,
                json!({"contains_real_person_material": true}),
                Err("contains_real_person_material"),
            ),
            (dub, json!({}), Err("video")),
            (
                dub,
                json!({"video": "https://x.test/v.mp4", "voice": "asset://sim/voice"}),
                Ok(()),
            ),
            (
                dub,
                json!({"video": "https://x.test/v.mp4", "voice": "ftp://x/v.mp3"}),
                Err("voice"),
            ),
        ];
        for (wf, inputs, expected) in table {
            let got = validate(wf, Some(inputs));
            match (expected, &got) {
                (Ok(()), Ok(())) => {}
                (Err(key), Err(detail)) => assert!(detail.contains(key), "{inputs}: {detail}"),
                _ => panic!(
                    "{} {inputs}: expected {expected:?}, got {got:?}",
                    wf.workflow_id
                ),
            }
        }
    }

    #[test]
    fn unknown_asset_message_matches_the_docs() {
        let vid = find("wf_seedance_video_2f0c").expect("catalog");
        let err = validate(vid, Some(&json!({"prompt": "p", "image": "asset://x"})));
        assert_eq!(
            err,
            Err("input image must be an uploaded file URL or file id".to_owned())
        );
    }
}
