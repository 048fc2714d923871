//! The body of `POST /workflows/run`: `{inputs, response_mode, user}`,
//! type-checked with Dify's `invalid_param` messages.

use serde_json::{Map, Value};

/// A run request that passed the body checks (not yet the form checks).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RunRequest {
    pub inputs: Map<String, Value>,
    /// `response_mode: "streaming"`; anything else accepted is blocking.
    pub streaming: bool,
    pub user: String,
}

/// Parses a run body. The error is the `invalid_param` message.
pub(crate) fn parse_run(body: &[u8]) -> Result<RunRequest, String> {
    let Ok(Value::Object(mut map)) = serde_json::from_slice::<Value>(body) else {
        return Err("the request body must be a JSON object".to_owned());
    };
    let inputs = match map.remove("inputs") {
        Some(Value::Object(inputs)) => inputs,
        None | Some(Value::Null) => return Err("inputs is required".to_owned()),
        Some(_) => return Err("inputs must be an object".to_owned()),
    };
    // Dify treats an absent mode as blocking; an unknown one is refused.
    let streaming = match map.remove("response_mode") {
        None | Some(Value::Null) => false,
        Some(Value::String(mode)) if mode == "blocking" => false,
        Some(Value::String(mode)) if mode == "streaming" => true,
        Some(other) => {
            return Err(format!(
                "response_mode must be blocking or streaming, got {other}"
            ));
        }
    };
    let user = parse_user(map.remove("user"))?;
    Ok(RunRequest {
        inputs,
        streaming,
        user,
    })
}

/// The `user` of a body: a non-empty string.
pub(crate) fn parse_user(user: Option<Value>) -> Result<String, String> {
    match user {
        Some(Value::String(user)) if !user.trim().is_empty() => Ok(user),
        _ => Err("user is required and must be a non-empty string".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<RunRequest, String> {
        parse_run(v.to_string().as_bytes())
    }

    #[test]
    fn body_rules() {
        assert!(parse_run(b"nope").is_err());
        assert!(parse(json!({"user": "u"})).is_err());
        assert!(parse(json!({"inputs": [], "user": "u"})).is_err());
        assert!(parse(json!({"inputs": {}})).is_err());
        assert!(parse(json!({"inputs": {}, "user": ""})).is_err());
        assert!(parse(json!({"inputs": {}, "user": "u", "response_mode": "fast"})).is_err());
        let ok = parse(json!({"inputs": {"q": 1}, "user": "u", "response_mode": "streaming"}))
            .expect("valid");
        assert!(ok.streaming);
        assert_eq!(ok.user, "u");
        assert!(
            !parse(json!({"inputs": {}, "user": "u"}))
                .expect("valid")
                .streaming
        );
    }
}
