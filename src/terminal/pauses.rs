//! How a paused provider profile reads in `wfq list` and `wfq top`: what
//! holds it and what ends the pause, by kind.

use crate::store::ProviderPause;

/// What ends a pause of this kind, for the person reading the line.
pub fn what_ends(kind: &str, profile: &str) -> String {
    match kind {
        "key" => "its runs wait until the provider accepts the API key again".to_owned(),
        "balance" => {
            "its runs wait until the account's balance covers them (read again every account_probe)"
                .to_owned()
        }
        "account" | "breaker" => {
            "its runs wait; one is let through every account_probe until the provider accepts it"
                .to_owned()
        }
        "manual" => format!(
            "paused by hand; resume with DELETE FROM wfq.provider_pauses WHERE profile = '{profile}' AND kind = 'manual'"
        ),
        _ => "its runs wait".to_owned(),
    }
}

/// One line per pause: `PAUSED profile (kind) since ... (worker w): reason; what ends it`.
pub fn pause_line(pause: &ProviderPause) -> String {
    format!(
        "PAUSED: provider profile `{}` ({}) since {} (worker {}): {}; {}",
        pause.profile,
        pause.kind,
        pause.paused_at.format("%Y-%m-%d %H:%M:%S UTC"),
        pause.worker,
        pause.reason,
        what_ends(&pause.kind, &pause.profile)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn each_kind_says_what_ends_it() {
        let pause = |kind: &str| ProviderPause {
            profile: "chenyu".into(),
            paused_at: chrono::Utc.with_ymd_and_hms(2026, 12, 1, 8, 0, 0).unwrap(),
            worker: "w1".into(),
            kind: kind.into(),
            reason: "INSUFFICIENT_BALANCE".into(),
        };
        assert_eq!(
            pause_line(&pause("balance")),
            "PAUSED: provider profile `chenyu` (balance) since 2026-12-01 08:00:00 UTC (worker w1): \
             INSUFFICIENT_BALANCE; its runs wait until the account's balance covers them (read again every account_probe)"
        );
        assert!(pause_line(&pause("key")).ends_with("accepts the API key again"));
        assert!(pause_line(&pause("breaker")).contains("one is let through"));
        assert!(pause_line(&pause("manual")).contains("DELETE FROM wfq.provider_pauses"));
    }
}
