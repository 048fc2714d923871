//! The last step of every client call: what it hands to the worker made
//! storable. The JSON text of each answer was repaired before it was parsed
//! (see [`super::storable`]); this bounds what was parsed from it (long
//! strings, large values) and every text built from it (messages, reasons),
//! and refuses run ids that cannot address the run any more.

use serde_json::Value;

use super::storable::{AnswerLimits, Repairs, fix_text, make_storable};
use super::{
    Accepted, FindOutcome, ManifestError, PollOutcome, ProviderError, RunReport, RunStatus,
    StopOutcome, StreamEnd, SubmitOutcome, Unclear,
};

/// Longest `Unclear::reason` kept: it is a log line and an event field, and
/// may quote a provider's body or a parse error that quotes one.
pub(crate) const MAX_REASON_BYTES: usize = 4096;

/// The key under which a provider's error object notes what was repaired
/// in it (an error has no field of its own for that).
pub const ERROR_REPAIRS_KEY: &str = "wfq_repairs";

/// A value that leaves a client: made storable within `limits`.
pub(crate) trait Storable: Sized {
    /// The same value, storable.
    fn storable(self, limits: &AnswerLimits) -> Self;
}

fn text(value: String, limit: usize, repairs: &mut Repairs) -> String {
    match fix_text(&value, limit, repairs) {
        std::borrow::Cow::Borrowed(_) => value,
        std::borrow::Cow::Owned(fixed) => fixed,
    }
}

fn optional(value: Option<String>, limits: &AnswerLimits, repairs: &mut Repairs) -> Option<String> {
    value.map(|v| text(v, limits.max_string_bytes, repairs))
}

fn value(v: Value, limits: &AnswerLimits, repairs: &mut Repairs) -> Value {
    let (v, more) = make_storable(v, limits);
    *repairs += more;
    v
}

/// Records `repairs` in a provider's error object (wrapped in one when the
/// detail is not an object).
pub(crate) fn note_repairs(detail: &mut Value, repairs: Repairs) {
    if repairs.is_empty() {
        return;
    }
    if !detail.is_object() {
        *detail = serde_json::json!({ "detail": detail.take() });
    }
    let Value::Object(map) = detail else {
        return;
    };
    let mut total = map
        .get(ERROR_REPAIRS_KEY)
        .and_then(|v| serde_json::from_value::<Repairs>(v.clone()).ok())
        .unwrap_or_default();
    total += repairs;
    map.insert(ERROR_REPAIRS_KEY.into(), total.to_json());
}

/// Whether a provider's id can address its run: ids go back to the provider
/// in later requests, so one that had to be repaired (U+FFFD where the
/// provider sent something unstorable), holds control characters or is
/// longer than a string may be would address another run, or none.
fn usable_id(id: &str, limits: &AnswerLimits) -> bool {
    id.len() <= limits.max_string_bytes && !id.chars().any(|c| c == '\u{FFFD}' || c.is_control())
}

impl Storable for Unclear {
    fn storable(mut self, _limits: &AnswerLimits) -> Self {
        self.reason = text(self.reason, MAX_REASON_BYTES, &mut Repairs::default());
        self
    }
}

impl Storable for ProviderError {
    fn storable(mut self, limits: &AnswerLimits) -> Self {
        let mut repairs = Repairs::default();
        self.code = text(self.code, limits.max_string_bytes, &mut repairs);
        self.message = text(self.message, limits.max_string_bytes, &mut repairs);
        self.detail = value(self.detail, limits, &mut repairs);
        note_repairs(&mut self.detail, repairs);
        self
    }
}

impl Storable for RunReport {
    fn storable(mut self, limits: &AnswerLimits) -> Self {
        let mut repairs = Repairs::default();
        let r = &mut repairs;
        self.status = match self.status {
            RunStatus::Unknown(status) => {
                RunStatus::Unknown(text(status, limits.max_string_bytes, r))
            }
            known => known,
        };
        self.run_status = optional(self.run_status, limits, r);
        self.freeze_status = optional(self.freeze_status, limits, r);
        self.submission_status = optional(self.submission_status, limits, r);
        self.settlement_status = optional(self.settlement_status, limits, r);
        self.task_id = optional(self.task_id, limits, r);
        self.prompt_id = optional(self.prompt_id, limits, r);
        self.currency = optional(self.currency, limits, r);
        self.error_code = optional(self.error_code, limits, r);
        self.error_message = optional(self.error_message, limits, r);
        self.outputs = self.outputs.map(|o| value(o, limits, r));
        self.raw = value(self.raw, limits, r);
        self.repairs += repairs;
        self
    }
}

/// An accepted run, storable; unclear when its ids cannot address the run.
fn accepted(mut a: Accepted, limits: &AnswerLimits) -> Result<Accepted, Unclear> {
    let ids = std::iter::once(("run id", Some(a.provider_run_id.as_str())))
        .chain(std::iter::once(("task id", a.task_id.as_deref())));
    for (what, id) in ids {
        if let Some(id) = id
            && !usable_id(id, limits)
        {
            return Err(Unclear::new(
                format!(
                    "the provider's {what} cannot be stored as sent ({} bytes; unstorable or control characters), so the run could not be followed: {id:?}",
                    id.len()
                ),
                None,
            )
            .storable(limits));
        }
    }
    let mut repairs = Repairs::default();
    let r = &mut repairs;
    a.revision_id = optional(a.revision_id, limits, r);
    a.prompt_id = optional(a.prompt_id, limits, r);
    a.billing_run_id = optional(a.billing_run_id, limits, r);
    a.currency = optional(a.currency, limits, r);
    a.freeze_status = optional(a.freeze_status, limits, r);
    a.run_status = optional(a.run_status, limits, r);
    a.raw = value(a.raw, limits, r);
    a.repairs += repairs;
    Ok(a)
}

impl Storable for SubmitOutcome {
    fn storable(self, limits: &AnswerLimits) -> Self {
        match self {
            SubmitOutcome::Accepted(a) => match accepted(a, limits) {
                Ok(a) => SubmitOutcome::Accepted(a),
                Err(u) => SubmitOutcome::Unclear(u),
            },
            SubmitOutcome::Rejected(e) => SubmitOutcome::Rejected(e.storable(limits)),
            SubmitOutcome::Unclear(u) => SubmitOutcome::Unclear(u.storable(limits)),
        }
    }
}

impl Storable for PollOutcome {
    fn storable(self, limits: &AnswerLimits) -> Self {
        match self {
            PollOutcome::Report(r) => PollOutcome::Report(Box::new(r.storable(limits))),
            PollOutcome::Rejected(e) => PollOutcome::Rejected(e.storable(limits)),
            PollOutcome::Unclear(u) => PollOutcome::Unclear(u.storable(limits)),
        }
    }
}

impl Storable for ManifestError {
    fn storable(self, limits: &AnswerLimits) -> Self {
        match self {
            ManifestError::Rejected(e) => ManifestError::Rejected(e.storable(limits)),
            ManifestError::Unclear(u) => ManifestError::Unclear(u.storable(limits)),
        }
    }
}

impl Storable for FindOutcome {
    fn storable(self, limits: &AnswerLimits) -> Self {
        match self {
            FindOutcome::Found(a) => match accepted(*a, limits) {
                Ok(a) => FindOutcome::Found(Box::new(a)),
                Err(u) => FindOutcome::Unclear(u),
            },
            FindOutcome::NotFound => FindOutcome::NotFound,
            FindOutcome::Unclear(u) => FindOutcome::Unclear(u.storable(limits)),
        }
    }
}

impl Storable for StopOutcome {
    fn storable(self, limits: &AnswerLimits) -> Self {
        match self {
            StopOutcome::Requested => StopOutcome::Requested,
            StopOutcome::Rejected(e) => StopOutcome::Rejected(e.storable(limits)),
            StopOutcome::Unclear(u) => StopOutcome::Unclear(u.storable(limits)),
        }
    }
}

impl Storable for StreamEnd {
    fn storable(self, limits: &AnswerLimits) -> Self {
        match self {
            StreamEnd::Finished(r) => StreamEnd::Finished(Box::new(r.storable(limits))),
            StreamEnd::Lost(u) => StreamEnd::Lost(u.storable(limits)),
        }
    }
}

impl<T, E: Storable> Storable for Result<T, E> {
    fn storable(self, limits: &AnswerLimits) -> Self {
        self.map_err(|e| e.storable(limits))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn limits() -> AnswerLimits {
        AnswerLimits {
            max_string_bytes: 1024,
            max_value_bytes: 1 << 20,
            max_depth: 8,
        }
    }

    #[test]
    fn reports_are_bounded_and_their_repairs_counted() {
        let report = RunReport {
            status: RunStatus::Unknown("odd\u{0}".into()),
            run_status: Some("odd\u{0}".into()),
            error_message: Some("x".repeat(5000)),
            outputs: Some(json!({"k\u{0}": "y".repeat(2000)})),
            raw: json!({"deep": [[[[[[[[[[1]]]]]]]]]]}),
            repairs: Repairs {
                lone_surrogate: 1,
                ..Repairs::default()
            },
            ..RunReport::default()
        }
        .storable(&limits());
        assert_eq!(report.status, RunStatus::Unknown("odd\u{FFFD}".into()));
        assert_eq!(report.run_status.as_deref(), Some("odd\u{FFFD}"));
        assert!(report.error_message.unwrap().len() <= 1024);
        assert!(report.outputs.unwrap()["k\u{FFFD}"].as_str().unwrap().len() <= 1024);
        assert_eq!(
            report.repairs,
            Repairs {
                nul: 3,
                lone_surrogate: 1,
                cut_strings: 2,
                cut_depth: 1,
                ..Repairs::default()
            }
        );
    }

    #[test]
    fn an_accepted_run_whose_id_was_repaired_is_unclear() {
        for id in ["wfrun_\u{FFFD}", "run\u{0}", "run\nid", &"r".repeat(1025)] {
            let outcome = SubmitOutcome::Accepted(Accepted {
                provider_run_id: id.into(),
                ..Accepted::default()
            })
            .storable(&limits());
            let SubmitOutcome::Unclear(u) = outcome else {
                panic!("{id:?} was accepted");
            };
            assert!(u.reason.contains("run id") && u.reason.len() <= MAX_REASON_BYTES);
            assert!(!u.reason.contains('\0'));
        }
        let task = FindOutcome::Found(Box::new(Accepted {
            provider_run_id: "r1".into(),
            task_id: Some("t\u{FFFD}".into()),
            ..Accepted::default()
        }))
        .storable(&limits());
        assert!(matches!(task, FindOutcome::Unclear(u) if u.reason.contains("task id")));
        let fine = SubmitOutcome::Accepted(Accepted {
            provider_run_id: "3fb345ba-e202-4b9a-944e".into(),
            run_status: Some("queued\u{0}".into()),
            ..Accepted::default()
        })
        .storable(&limits());
        let SubmitOutcome::Accepted(a) = fine else {
            panic!("refused a usable id");
        };
        assert_eq!(a.run_status.as_deref(), Some("queued\u{FFFD}"));
        assert_eq!(a.repairs.nul, 1);
    }

    #[test]
    fn errors_and_reasons_are_bounded_and_errors_note_their_repairs() {
        let e = ProviderError {
            code: "C\u{0}".into(),
            message: "m".repeat(3000),
            detail: json!({"big": "z".repeat(3000), ERROR_REPAIRS_KEY: {"nul": 2}}),
            http_status: 400,
        }
        .storable(&limits());
        assert_eq!(e.code, "C\u{FFFD}");
        assert!(e.message.len() <= 1024);
        assert_eq!(
            e.detail[ERROR_REPAIRS_KEY],
            json!({"nul": 3, "cut_strings": 2})
        );
        let mut plain = json!("text");
        note_repairs(
            &mut plain,
            Repairs {
                nul: 1,
                ..Repairs::default()
            },
        );
        assert_eq!(
            plain,
            json!({"detail": "text", ERROR_REPAIRS_KEY: {"nul": 1}})
        );
        let mut untouched = json!({"a": 1});
        note_repairs(&mut untouched, Repairs::default());
        assert_eq!(untouched, json!({"a": 1}));
        let u = Unclear::new(format!("HTTP 502: \u{0}{}", "b".repeat(10_000)), Some(502))
            .storable(&limits());
        assert!(u.reason.len() <= MAX_REASON_BYTES && !u.reason.contains('\0'));
    }
}
