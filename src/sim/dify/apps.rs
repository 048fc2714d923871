//! The simulated Dify apps: their input forms (`GET /parameters`), how their
//! runs end, and the validation of `inputs` against a form, with the
//! messages Dify uses.

use serde_json::{Map, Value, json};

/// The kind of a form control, as named in `user_input_form`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Control {
    Paragraph,
    TextInput,
    Select(&'static [&'static str]),
    Number,
    /// A single file of these types (`image`, `document`, ...): an
    /// object `{"type", "transfer_method", "upload_file_id" | "url"}`.
    File(&'static [&'static str]),
    /// A list of such files (`file-list`), at most `max_length` of them.
    FileList(&'static [&'static str]),
}

/// One entry of an app's input form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Field {
    pub variable: &'static str,
    pub label: &'static str,
    pub control: Control,
    pub required: bool,
    pub max_length: Option<usize>,
}

/// How a run of the app ends when nobody stops it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    Succeeds,
    /// `failed`, with `error`; tokens and price are still counted.
    Fails,
    /// `partial-succeeded`: a node failed with "continue on error".
    PartlySucceeds,
}

/// A published Dify workflow app. In real life the API key selects it; in
/// the simulator the `/dify/{app}/v1` path segment does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DifyApp {
    pub name: &'static str,
    /// The one published workflow version, accepted by
    /// `POST /workflows/{workflow_id}/run` and reported as `workflow_id`.
    pub workflow_id: &'static str,
    /// The version label shown in the logs (a timestamp, as in Dify).
    pub version: &'static str,
    pub form: &'static [Field],
    pub ending: Ending,
}

/// The error of a node failure (`fails`, and the failed node of `partial`).
pub(crate) const NODE_FAILURE: &str = "simulated node failure";

const QUERY: Field = Field {
    variable: "query",
    label: "Query",
    control: Control::Paragraph,
    required: true,
    max_length: None,
};

const TEXT_FORM: &[Field] = &[
    QUERY,
    Field {
        variable: "tone",
        label: "Tone",
        control: Control::Select(&["formal", "casual"]),
        required: false,
        max_length: None,
    },
    Field {
        variable: "max_words",
        label: "Max words",
        control: Control::Number,
        required: false,
        max_length: None,
    },
    Field {
        variable: "title",
        label: "Title",
        control: Control::TextInput,
        required: false,
        max_length: Some(48),
    },
];

const PICTURE_FORM: &[Field] = &[
    QUERY,
    Field {
        variable: "photo",
        label: "Photo",
        control: Control::File(&["image"]),
        required: true,
        max_length: None,
    },
    Field {
        variable: "references",
        label: "References",
        control: Control::FileList(&["image", "document"]),
        required: false,
        max_length: Some(3),
    },
];

/// Every app the simulator serves.
pub(crate) const APPS: &[DifyApp] = &[
    DifyApp {
        name: "text",
        workflow_id: "ver-text-1",
        version: "2025-01-06 09:30:00.000000",
        form: TEXT_FORM,
        ending: Ending::Succeeds,
    },
    DifyApp {
        name: "fails",
        workflow_id: "ver-fails-1",
        version: "2025-01-06 09:31:00.000000",
        form: &[QUERY],
        ending: Ending::Fails,
    },
    DifyApp {
        name: "partial",
        workflow_id: "ver-partial-1",
        version: "2025-01-06 09:32:00.000000",
        form: &[QUERY],
        ending: Ending::PartlySucceeds,
    },
    DifyApp {
        name: "picture",
        workflow_id: "ver-picture-1",
        version: "2025-01-06 09:33:00.000000",
        form: PICTURE_FORM,
        ending: Ending::Succeeds,
    },
];

/// The app called `name`.
pub(crate) fn find(name: &str) -> Option<&'static DifyApp> {
    APPS.iter().find(|app| app.name == name)
}

impl DifyApp {
    /// The status a run ends with when it is not stopped.
    pub(crate) fn final_status(&self) -> &'static str {
        match self.ending {
            Ending::Succeeds => "succeeded",
            Ending::Fails => "failed",
            Ending::PartlySucceeds => "partial-succeeded",
        }
    }

    /// The body of `GET /parameters`, shaped as in the docs.
    pub(crate) fn parameters(&self) -> Value {
        let form: Vec<Value> = self
            .form
            .iter()
            .map(|field| {
                let mut control = json!({
                    "label": field.label,
                    "variable": field.variable,
                    "required": field.required,
                    // Dify sends "" for an unset default, whatever the control.
                    "default": "",
                });
                if let Some(max) = field.max_length {
                    control["max_length"] = json!(max);
                }
                let kind = match field.control {
                    Control::Paragraph => "paragraph",
                    Control::TextInput => "text-input",
                    Control::Number => "number",
                    Control::Select(options) => {
                        control["options"] = json!(options);
                        "select"
                    }
                    Control::File(types) | Control::FileList(types) => {
                        control["allowed_file_types"] = json!(types);
                        control["allowed_file_extensions"] = json!([]);
                        control["allowed_file_upload_methods"] =
                            json!(["local_file", "remote_url"]);
                        if matches!(field.control, Control::File(_)) {
                            "file"
                        } else {
                            "file-list"
                        }
                    }
                };
                json!({ kind: control })
            })
            .collect();
        json!({
            "user_input_form": form,
            "file_upload": {"image": {
                "enabled": false,
                "number_limits": 3,
                "detail": "high",
                "transfer_methods": ["remote_url", "local_file"],
            }},
            "system_parameters": {
                "file_size_limit": 15,
                "image_file_size_limit": 10,
                "audio_file_size_limit": 50,
                "video_file_size_limit": 100,
            },
        })
    }

    /// The outputs of a run that got to the end with these inputs.
    pub(crate) fn outputs(&self, inputs: &Map<String, Value>) -> Value {
        let text = |key: &str| inputs.get(key).and_then(Value::as_str).unwrap_or("");
        let mut words: Vec<&str> = text("query").split_whitespace().collect();
        if let Some(max) = inputs.get("max_words").and_then(number) {
            // A word budget below one still says something.
            words.truncate((max.max(1.0)) as usize);
        }
        let tone = match text("tone") {
            "" => "neutral",
            tone => tone,
        };
        let title = match text("title") {
            "" => "Untitled",
            title => title,
        };
        json!({"text": format!("[{tone}] {title}: {}", words.join(" "))})
    }
}

/// Checks `inputs` against `app`'s form in form order, as Dify does, and
/// returns its message for the first problem. Keys outside the form are
/// ignored, as Dify ignores them. `uploaded` says whether an
/// `upload_file_id` names a file uploaded to this app.
pub(crate) fn validate(
    app: &DifyApp,
    inputs: &Map<String, Value>,
    uploaded: &dyn Fn(&str) -> bool,
) -> Result<(), String> {
    for field in app.form {
        let var = field.variable;
        let value = inputs.get(var).filter(|v| !is_blank(v));
        let Some(value) = value else {
            if field.required {
                return Err(format!("{var} is required in input form"));
            }
            continue;
        };
        match field.control {
            Control::Paragraph | Control::TextInput => {
                let Some(text) = value.as_str() else {
                    return Err(format!("{var} in input form must be a string"));
                };
                if let Some(max) = field.max_length
                    && text.chars().count() > max
                {
                    return Err(format!(
                        "{var} in input form must be less than {max} characters"
                    ));
                }
            }
            Control::Select(options) => {
                if !value.as_str().is_some_and(|v| options.contains(&v)) {
                    return Err(format!(
                        "{var} in input form must be one of the following: {options:?}"
                    ));
                }
            }
            Control::Number => {
                if number(value).is_none() {
                    return Err(format!("{var} in input form must be a valid number"));
                }
            }
            Control::File(types) => check_file(var, types, value, uploaded)?,
            Control::FileList(types) => {
                let Some(files) = value.as_array() else {
                    return Err(format!("{var} in input form must be a list of files"));
                };
                if let Some(max) = field.max_length
                    && files.len() > max
                {
                    return Err(format!("{var} in input form takes at most {max} files"));
                }
                for file in files {
                    check_file(var, types, file, uploaded)?;
                }
            }
        }
    }
    Ok(())
}

/// A file value: `{"type", "transfer_method": "local_file",
/// "upload_file_id"}` naming an upload of this app, or `remote_url` with
/// a `url`.
fn check_file(
    var: &str,
    types: &[&str],
    value: &Value,
    uploaded: &dyn Fn(&str) -> bool,
) -> Result<(), String> {
    let Some(file) = value.as_object() else {
        return Err(format!("{var} in input form must be a file"));
    };
    let text = |name: &str| file.get(name).and_then(Value::as_str).unwrap_or("");
    if !types.contains(&text("type")) {
        return Err(format!(
            "{var} in input form must be a file of type {types:?}, not {:?}",
            text("type")
        ));
    }
    match text("transfer_method") {
        "local_file" if uploaded(text("upload_file_id")) => Ok(()),
        "local_file" => Err(format!(
            "{var}: upload file {:?} not found",
            text("upload_file_id")
        )),
        "remote_url" if text("url").starts_with("http") => Ok(()),
        other => Err(format!("{var}: transfer_method {other:?} is not supported")),
    }
}

/// `null` and `""` count as "not given", as in Dify.
fn is_blank(value: &Value) -> bool {
    value.is_null() || value.as_str() == Some("")
}

/// A number input: a JSON number or a string holding one (Dify accepts
/// both). Not money: an f64 is fine here.
fn number(value: &Value) -> Option<f64> {
    match value {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok().filter(|n| n.is_finite()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(app: &str, inputs: Value) -> Result<(), String> {
        let Value::Object(map) = inputs else {
            panic!("object")
        };
        validate(find(app).expect("app"), &map, &|id| id == "up-1")
    }

    #[test]
    fn form_rules_and_messages() {
        assert_eq!(
            check("text", json!({})),
            Err("query is required in input form".to_owned())
        );
        assert!(check("text", json!({"query": ""})).is_err());
        assert!(check("text", json!({"query": "hi", "extra": 1})).is_ok());
        assert!(check("text", json!({"query": 5})).is_err());
        assert!(
            check(
                "text",
                json!({"query": "q", "tone": "formal", "max_words": "12"})
            )
            .is_ok()
        );
        assert!(
            check("text", json!({"query": "q", "tone": "angry"}))
                .unwrap_err()
                .contains("one of the following")
        );
        assert!(check("text", json!({"query": "q", "max_words": "many"})).is_err());
        assert!(check("text", json!({"query": "q", "max_words": true})).is_err());
        assert!(check("text", json!({"query": "q", "title": "x".repeat(48)})).is_ok());
        assert!(check("text", json!({"query": "q", "title": "x".repeat(49)})).is_err());
        assert!(check("fails", json!({"query": "q"})).is_ok());
        let photo = |v: Value| check("picture", json!({"query": "q", "photo": v}));
        assert!(
            photo(
                json!({"type": "image", "transfer_method": "local_file", "upload_file_id": "up-1"})
            )
            .is_ok()
        );
        assert!(
            photo(
                json!({"type": "image", "transfer_method": "local_file", "upload_file_id": "up-2"})
            )
            .unwrap_err()
            .contains("not found")
        );
        assert!(
            photo(json!({"type": "document", "transfer_method": "local_file", "upload_file_id": "up-1"}))
                .is_err()
        );
        assert!(photo(json!("asset://x")).is_err());
        assert!(check("picture", json!({"query": "q"})).is_err());
        let one =
            json!({"type": "document", "transfer_method": "local_file", "upload_file_id": "up-1"});
        let with_refs = |v: Value| {
            check(
                "picture",
                json!({"query": "q", "photo": {"type": "image", "transfer_method": "local_file", "upload_file_id": "up-1"}, "references": v}),
            )
        };
        assert!(with_refs(json!([one])).is_ok());
        assert!(with_refs(one.clone()).is_err(), "a list, not one file");
        assert!(with_refs(json!([one, one, one, one])).is_err());
    }

    #[test]
    fn parameters_follow_the_docs() {
        let p = find("text").expect("app").parameters();
        assert_eq!(p["user_input_form"][0]["paragraph"]["variable"], "query");
        assert_eq!(p["user_input_form"][0]["paragraph"]["default"], "");
        assert_eq!(p["user_input_form"][1]["select"]["options"][1], "casual");
        assert_eq!(p["user_input_form"][2]["number"]["required"], false);
        assert_eq!(p["user_input_form"][3]["text-input"]["max_length"], 48);
        assert_eq!(p["system_parameters"]["file_size_limit"], 15);
        let p = find("picture").expect("app").parameters();
        assert_eq!(p["user_input_form"][1]["file"]["variable"], "photo");
        assert_eq!(
            p["user_input_form"][1]["file"]["allowed_file_types"],
            json!(["image"])
        );
    }

    #[test]
    fn outputs_respect_the_word_budget() {
        let app = find("text").expect("app");
        let Value::Object(inputs) =
            json!({"query": "one two three", "max_words": 2, "tone": "casual"})
        else {
            unreachable!()
        };
        assert_eq!(app.outputs(&inputs)["text"], "[casual] Untitled: one two");
    }
}
