//! The provider profiles as the dashboard shows them: kind and limits,
//! never a key. Read from a worker's parsed configuration, or (for
//! `wfq web`, which holds no provider key) from the file's text alone.

use rust_decimal::Decimal;

use crate::config::{Config, ProviderKind};

/// One `[providers.NAME]` profile, without its secret.
#[derive(Debug, Clone, PartialEq)]
pub struct ProfileInfo {
    /// The profile name (`wfq.runs.provider`).
    pub name: String,
    /// The API it speaks.
    pub kind: ProviderKind,
    /// `spend.daily_budget`.
    pub daily_budget: Option<Decimal>,
    /// `spend.max_outstanding_frozen`.
    pub max_outstanding_frozen: Option<Decimal>,
    /// `unknown_cost`.
    pub unknown_cost: Option<Decimal>,
    /// The limits as written, for display: `(key, value)`.
    pub limits: Vec<(String, String)>,
}

impl ProfileInfo {
    /// `kind` as written in worker.toml.
    pub fn kind_name(&self) -> &'static str {
        match self.kind {
            ProviderKind::Chenyu => "chenyu",
            ProviderKind::Dify => "dify",
            ProviderKind::Gptbots => "gptbots",
        }
    }

    /// Whether `wfq cancel` can stop its running runs at the provider.
    pub fn can_stop_runs(&self) -> bool {
        self.kind == ProviderKind::Dify
    }

    /// Whether a lost submit of it can neither be replayed nor found.
    pub fn unfindable(&self) -> bool {
        self.kind == ProviderKind::Gptbots
    }

    /// The profiles of a parsed configuration.
    pub fn of_config(config: &Config) -> Vec<ProfileInfo> {
        config
            .providers
            .iter()
            .map(|(name, p)| {
                let mut limits = Vec::new();
                let mut put = |k: &str, v: Option<String>| {
                    if let Some(v) = v {
                        limits.push((k.to_owned(), v));
                    }
                };
                put(
                    "max_outstanding_frozen",
                    p.spend.max_outstanding_frozen.map(|d| d.to_string()),
                );
                put("daily_budget", p.spend.daily_budget.map(|d| d.to_string()));
                put("max_running", p.spend.max_running.map(|n| n.to_string()));
                put("unknown_cost", p.spend.unknown_cost.map(|d| d.to_string()));
                put(
                    "requests_per_second",
                    p.requests_per_second.map(|r| r.to_string()),
                );
                put(
                    "max_submits_in_flight",
                    p.max_submits_in_flight.map(|n| n.to_string()),
                );
                ProfileInfo {
                    name: name.clone(),
                    kind: p.kind,
                    daily_budget: p.spend.daily_budget,
                    max_outstanding_frozen: p.spend.max_outstanding_frozen,
                    unknown_cost: p.spend.unknown_cost,
                    limits,
                }
            })
            .collect()
    }

    /// The profiles of a worker.toml's text, without reading any secret.
    pub fn of_toml(text: &str, origin: &str) -> Result<Vec<ProfileInfo>, String> {
        let kinds = ProviderKind::of_profiles(text, origin).map_err(|e| e.to_string())?;
        let table: toml::Table = toml::from_str(text).map_err(|e| format!("{origin}: {e}"))?;
        let providers = table.get("providers").and_then(|v| v.as_table());
        let mut out = Vec::new();
        for (name, kind) in kinds {
            let profile = providers
                .and_then(|p| p.get(&name))
                .and_then(|v| v.as_table());
            let value = |key: &str| profile.and_then(|p| p.get(key));
            let amount = |key: &str| -> Result<Option<Decimal>, String> {
                match value(key) {
                    None => Ok(None),
                    Some(toml::Value::String(s)) => s.trim().parse().map(Some).map_err(|_| {
                        format!("{origin}: providers.{name}.{key}: `{s}` is not an amount")
                    }),
                    Some(toml::Value::Integer(n)) => Ok(Some(Decimal::from(*n))),
                    Some(other) => Err(format!(
                        "{origin}: providers.{name}.{key}: {} is not an amount",
                        shown(other)
                    )),
                }
            };
            let limits = [
                "max_outstanding_frozen",
                "daily_budget",
                "max_running",
                "unknown_cost",
                "requests_per_second",
                "max_submits_in_flight",
            ]
            .iter()
            .filter_map(|key| value(key).map(|v| ((*key).to_owned(), shown(v))))
            .collect();
            out.push(ProfileInfo {
                daily_budget: amount("daily_budget")?,
                max_outstanding_frozen: amount("max_outstanding_frozen")?,
                unknown_cost: amount("unknown_cost")?,
                name,
                kind,
                limits,
            });
        }
        Ok(out)
    }
}

/// A TOML value as written (a string without its quotes).
fn shown(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(n) => n.to_string(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        _ => "(a table or list)".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_are_read_without_their_keys() {
        let text = r#"
            [providers.chenyu]
            kind = "chenyu"
            base_url = "http://127.0.0.1:1/api/open/v2"
            api_key_env = "UNSET_KEY_VARIABLE"
            daily_budget = "12.50"
            max_running = 4
            [providers.news]
            kind = "gptbots"
            base_url = "http://127.0.0.1:1"
            api_key_env = "UNSET_KEY_VARIABLE"
        "#;
        let profiles = ProfileInfo::of_toml(text, "test").unwrap();
        assert_eq!(profiles.len(), 2);
        assert_eq!(profiles[0].name, "chenyu");
        assert_eq!(profiles[0].daily_budget, Some("12.50".parse().unwrap()));
        assert_eq!(
            profiles[0].limits,
            vec![
                ("daily_budget".to_owned(), "12.50".to_owned()),
                ("max_running".to_owned(), "4".to_owned())
            ]
        );
        assert!(profiles[1].unfindable());
        assert!(ProfileInfo::of_toml("[providers.x]\nkind = \"nope\"", "t").is_err());
    }
}
