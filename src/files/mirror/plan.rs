//! Which outputs of a succeeded run are files to copy: a pure function of
//! the outputs. A file is an http(s) URL: a value, an item of a list, or
//! the `url` of an object (Dify's file objects). Whether it is media is
//! decided when its answer's content type is known.

use serde_json::Value;

use crate::store::PlannedFile;

fn is_link(text: &str) -> bool {
    let lower = text.get(..8).unwrap_or(text).to_ascii_lowercase();
    (lower.starts_with("https://") || lower.starts_with("http://"))
        && !text.contains(char::is_whitespace)
}

/// The files among `outputs` of run `run_id` of profile `profile`.
pub fn plan(run_id: i64, profile: &str, outputs: Option<&Value>) -> Vec<PlannedFile> {
    let Some(Value::Object(outputs)) = outputs else {
        return Vec::new();
    };
    let mut files = Vec::new();
    let mut add = |key: &str, position: usize, json_path: Vec<String>, url: &str| {
        files.push(PlannedFile {
            run_id,
            key: key.to_owned(),
            position: position as i32,
            json_path,
            profile: profile.to_owned(),
            source: url.to_owned(),
        });
    };
    let url_of = |value: &Value| -> Option<(String, Option<&'static str>)> {
        match value {
            Value::String(s) if is_link(s) => Some((s.clone(), None)),
            Value::Object(o) => match o.get("url") {
                Some(Value::String(s)) if is_link(s) => Some((s.clone(), Some("url"))),
                _ => None,
            },
            _ => None,
        }
    };
    for (key, value) in outputs {
        match value {
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    if let Some((url, member)) = url_of(item) {
                        let mut path = vec![key.clone(), i.to_string()];
                        path.extend(member.map(str::to_owned));
                        add(key, i, path, &url);
                    }
                }
            }
            other => {
                if let Some((url, member)) = url_of(other) {
                    let mut path = vec![key.clone()];
                    path.extend(member.map(str::to_owned));
                    add(key, 0, path, &url);
                }
            }
        }
    }
    files
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn links_in_values_lists_and_file_objects() {
        let outputs = json!({
            "image": "https://cdn.example/a.png?sig=1",
            "frames": ["https://cdn.example/0.png", "not a link", "http://cdn.example/2.png"],
            "doc": {"dify_model_identity": "__dify__file__", "url": "https://files.example/d.pdf", "type": "document"},
            "text": "https://looks like a link but has spaces",
            "count": 3,
            "nested": {"deep": {"url": "https://x/y.png"}},
        });
        let files = plan(7, "chenyu", Some(&outputs));
        let got: Vec<_> = files
            .iter()
            .map(|f| {
                (
                    f.key.as_str(),
                    f.position,
                    f.json_path.join("."),
                    f.source.as_str(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    "doc",
                    0,
                    "doc.url".to_owned(),
                    "https://files.example/d.pdf"
                ),
                (
                    "frames",
                    0,
                    "frames.0".to_owned(),
                    "https://cdn.example/0.png"
                ),
                (
                    "frames",
                    2,
                    "frames.2".to_owned(),
                    "http://cdn.example/2.png"
                ),
                (
                    "image",
                    0,
                    "image".to_owned(),
                    "https://cdn.example/a.png?sig=1"
                ),
            ]
        );
        assert!(plan(7, "p", Some(&json!({"text": "hello"}))).is_empty());
        assert!(plan(7, "p", None).is_empty());
        assert!(plan(7, "p", Some(&json!([1]))).is_empty());
    }
}
