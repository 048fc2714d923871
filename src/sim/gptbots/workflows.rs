//! The simulated GPTBots workflows and the checks of an invoke body
//! (`{userId?, input, isAsync?, webhook?}`) against their Start node.

use serde_json::{Map, Value, json};

/// A published GPTBots workflow. In real life the API key selects it; in
/// the simulator the `/gptbots/{workflow}` path segment does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct GptWorkflow {
    pub name: &'static str,
    pub workflow_id: &'static str,
    pub workflow_name: &'static str,
    pub workflow_version: &'static str,
    /// Ends `FAILED` instead of `SUCCEED`.
    pub fails: bool,
    /// Fails saying it cannot fetch the links in its input, quoting them
    /// whole (as GPTBots does when a file's URL does not work).
    pub quotes_links: bool,
}

/// Every workflow the simulator serves.
pub(crate) const WORKFLOWS: &[GptWorkflow] = &[
    GptWorkflow {
        name: "news",
        workflow_id: "66f2a1c0e4b0a1b2c3d4e5f6",
        workflow_name: "todayNews",
        workflow_version: "1.0.1",
        fails: false,
        quotes_links: false,
    },
    GptWorkflow {
        name: "fails",
        workflow_id: "66f2a1c0e4b0a1b2c3d4e5f7",
        workflow_name: "alwaysFails",
        workflow_version: "1.0.0",
        fails: true,
        quotes_links: false,
    },
    GptWorkflow {
        name: "unfetchable",
        workflow_id: "66f2a1c0e4b0a1b2c3d4e5f8",
        workflow_name: "cannotFetchFiles",
        workflow_version: "1.0.0",
        fails: true,
        quotes_links: true,
    },
];

/// The error message of a failed run.
pub(crate) const FAILURE: &str = "simulated workflow failure";

impl GptWorkflow {
    /// The error message of a failed run of this workflow with `input`.
    pub(crate) fn failure(&self, input: &Value) -> String {
        if !self.quotes_links {
            return FAILURE.to_owned();
        }
        let links: Vec<&str> = input
            .as_object()
            .into_iter()
            .flat_map(|members| members.values())
            .filter_map(Value::as_str)
            .filter(|text| text.starts_with("http://") || text.starts_with("https://"))
            .collect();
        format!("cannot fetch {}: 403 Forbidden", links.join(", "))
    }
}

/// The workflow called `name`.
pub(crate) fn find(name: &str) -> Option<&'static GptWorkflow> {
    WORKFLOWS.iter().find(|wf| wf.name == name)
}

impl GptWorkflow {
    /// The End node's output for `input`.
    pub(crate) fn output(&self, input: &Value) -> Value {
        let topic = input.get("topic").and_then(Value::as_str).unwrap_or("");
        json!({"news": [
            {"title": format!("{topic}: the simulated headline"),
             "summary": format!("What happened today about {topic}, in two sentences. Nothing real."),
             "media": "Simulated Wire"},
            {"title": format!("{topic}, explained"),
             "summary": "A longer look, also simulated.",
             "media": "The Sim Times"},
        ]})
    }
}

/// An invoke body that passed the checks.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Invoke {
    pub user_id: Option<String>,
    pub input: Value,
    pub is_async: bool,
}

/// Most webhooks per invoke, as documented.
const MAX_WEBHOOKS: usize = 5;

/// Parses and checks an invoke body. The error is the message of a
/// `400001` answer.
pub(crate) fn parse_invoke(body: &[u8]) -> Result<Invoke, String> {
    let Ok(Value::Object(mut map)) = serde_json::from_slice::<Value>(body) else {
        return Err("request body must be a JSON object".to_owned());
    };
    let user_id = match map.remove("userId") {
        None | Some(Value::Null) => None,
        Some(Value::String(id)) => Some(id),
        Some(_) => return Err("userId must be a string".to_owned()),
    };
    let is_async = match map.remove("isAsync") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => b,
        Some(_) => return Err("isAsync must be a boolean".to_owned()),
    };
    match map.remove("webhook") {
        None | Some(Value::Null) => {}
        Some(Value::Array(hooks)) if hooks.len() <= MAX_WEBHOOKS => {}
        Some(_) => {
            return Err(format!(
                "webhook must be an array of at most {MAX_WEBHOOKS}"
            ));
        }
    }
    let input = match map.remove("input") {
        Some(Value::Object(input)) => input,
        None | Some(Value::Null) => return Err("input.topic is required".to_owned()),
        Some(_) => return Err("input must be an object".to_owned()),
    };
    check_start(&input)?;
    Ok(Invoke {
        user_id,
        input: Value::Object(input),
        is_async,
    })
}

/// The Start node of both workflows: `topic`, a required string.
fn check_start(input: &Map<String, Value>) -> Result<(), String> {
    match input.get("topic") {
        None | Some(Value::Null) => Err("input.topic is required".to_owned()),
        Some(Value::String(_)) => Ok(()),
        Some(_) => Err("input.topic must be a string".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> Result<Invoke, String> {
        parse_invoke(v.to_string().as_bytes())
    }

    #[test]
    fn invoke_rules() {
        assert_eq!(
            parse(json!({"input": {}})),
            Err("input.topic is required".to_owned())
        );
        assert!(parse(json!({"input": "News"})).is_err());
        assert!(parse(json!({"input": {"topic": 3}})).is_err());
        assert!(parse(json!({"input": {"topic": "x"}, "isAsync": "yes"})).is_err());
        assert!(parse(json!({"input": {"topic": "x"}, "webhook": [1, 2, 3, 4, 5, 6]})).is_err());
        let ok =
            parse(json!({"input": {"topic": "x"}, "isAsync": true, "userId": "u"})).expect("valid");
        assert!(ok.is_async);
        assert_eq!(ok.user_id.as_deref(), Some("u"));
        assert!(parse_invoke(b"[]").is_err());
    }

    #[test]
    fn the_unfetchable_workflow_quotes_the_links_it_was_given() {
        let wf = find("unfetchable").expect("wf");
        assert!(wf.fails);
        assert_eq!(
            wf.failure(&json!({"topic": "t", "img": "https://b/k?X-Amz-Signature=s"})),
            "cannot fetch https://b/k?X-Amz-Signature=s: 403 Forbidden"
        );
        assert_eq!(find("fails").expect("wf").failure(&json!({})), FAILURE);
    }

    #[test]
    fn output_has_the_documented_shape() {
        let out = find("news")
            .expect("wf")
            .output(&json!({"topic": "Hawaii"}));
        assert_eq!(out["news"][0]["media"], "Simulated Wire");
        assert!(out["news"][1]["summary"].is_string());
    }
}
