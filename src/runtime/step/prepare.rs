//! Before a submit: the manifest, the inputs, consent, and the money limits.

use chrono::Utc;
use serde_json::{Map, Value};

use super::{Engine, StepError, log_transition, progress, record, unit};
use crate::inputs::complete_inputs;
use crate::lifecycle::{self, Transition};
use crate::store::{self, ClaimedRun};

/// What a submit sends, once the inputs passed (or were recorded).
pub(super) struct Prepared {
    pub(super) revision_id: Option<String>,
    pub(super) sent_inputs: Map<String, Value>,
    /// The quote, for the spend guard and the balance (`None` when the
    /// provider quotes nothing).
    pub(super) quote: Option<Quote>,
}

/// A workflow's quote from its manifest (or recorded by an earlier
/// attempt).
pub(super) struct Quote {
    pub(super) amount: Option<rust_decimal::Decimal>,
    pub(super) currency: Option<String>,
}

impl Quote {
    /// The quote an earlier attempt recorded with the inputs it sent; its
    /// currency is on the row already.
    pub(super) fn recorded(amount: rust_decimal::Decimal) -> Self {
        Quote {
            amount: Some(amount),
            currency: None,
        }
    }
}

/// Records `begin` only if the run's quote fits the profile's money
/// limits; otherwise holds the run in `queued` with the reason.
pub(super) async fn begin_within_limits(
    engine: &Engine,
    run: &ClaimedRun,
    profile: &crate::runtime::Profile,
    quote: Option<&Quote>,
    begin: &Transition,
    ticket: &mut Option<crate::runtime::Ticket>,
) -> Result<Option<i64>, StepError> {
    let database = |source| StepError::Database {
        run_id: run.id,
        event: begin.event.kind,
        source,
    };
    let guarded = store::begin_within_limits(
        &engine.pool,
        store::GuardedRun {
            id: run.id,
            version: run.version,
            from: run.state,
            provider: &run.provider,
            quote: quote.and_then(|q| q.amount),
        },
        &engine.worker_id,
        engine.lease,
        begin,
        &profile.spend,
        &engine.budget_timezone,
    )
    .await
    .map_err(database)?;
    match guarded {
        store::Guarded::Applied(version) => {
            if version.is_some() {
                log_transition(run.state, begin);
            }
            Ok(version)
        }
        store::Guarded::Busy => {
            // Another worker holds the profile's spend lock for long: come
            // back shortly rather than tie up a connection waiting.
            if let Some(ticket) = ticket.take() {
                ticket.unused();
            }
            let t = lifecycle::throttled(run.state, engine.budget_recheck, Utc::now());
            record(engine, run, run.state, run.version, &t).await?;
            Ok(None)
        }
        store::Guarded::Held(hold) if hold.never_fits() => {
            tracing::warn!(reason = %hold, "the run's quote alone exceeds a spend limit; failing it");
            let t = lifecycle::quote_above_limit(&hold.to_string());
            record(engine, run, run.state, run.version, &t).await?;
            Ok(None)
        }
        store::Guarded::Held(hold) => {
            tracing::info!(reason = %hold, "run held back by a spend limit");
            if let Some(ticket) = ticket.take() {
                ticket.unused();
            }
            // A daily budget frees up at the next budget day; the other
            // limits when money is released or a run ends, which wakes held
            // runs (`wake_held_runs`): the hour is only a backstop, so that
            // a held backlog does not come due every few seconds ahead of
            // fresh runs, each check taking the profile's lock.
            let due = if hold.until_next_day() {
                store::next_budget_day(&engine.pool, &engine.budget_timezone)
                    .await
                    .map_err(database)?
            } else if hold.needs_an_operator() {
                // An operator's fix (settling by hand) wakes nothing but a
                // starting worker or a run of the profile ending: look again
                // now and then, not every few seconds for the whole queue.
                Utc::now() + chrono::Duration::minutes(5)
            } else {
                Utc::now() + chrono::Duration::hours(1)
            };
            store::hold_run(
                &engine.pool,
                run.id,
                run.version,
                &engine.worker_id,
                &hold.to_string(),
                due,
            )
            .await
            .map_err(database)?;
            Ok(None)
        }
    }
}

/// Reads the manifest, checks the inputs and uploads the input files
/// (`{"$file": ...}`, see `files::upload`). `Err` is the transition that
/// ends this step without a submit.
pub(super) async fn prepare(
    engine: &Engine,
    run: &ClaimedRun,
    profile: &crate::runtime::Profile,
) -> Result<Prepared, Transition> {
    let resolved;
    let inputs = if run.depends_on.is_empty() && crate::chains::references(&run.inputs).is_empty() {
        &run.inputs
    } else {
        resolved = resolve_references(engine, run).await?;
        &resolved
    };
    let split = match inputs {
        Value::Object(inputs) => {
            crate::files::split_inputs(inputs).map_err(|e| lifecycle::reject_inputs(&e))?
        }
        _ => return check_inputs(engine, run, profile, inputs).await,
    };
    let inputs = Value::Object(split.inputs);
    let mut prepared = check_inputs(engine, run, profile, &inputs).await?;
    if !split.files.is_empty() {
        crate::files::upload::attach_files(
            engine,
            run,
            profile,
            &split.files,
            &mut prepared.sent_inputs,
        )
        .await?;
    }
    Ok(prepared)
}

/// A chained run's inputs with its dependencies' outputs in place of the
/// `{"$output": ...}` references (see `chains::resolve`), once every run of
/// its `depends_on` is seen there and succeeded (`chains::check_dependencies`): a media output
/// the worker's store holds a copy of goes on as a `$file` value (uploaded
/// like any input file), anything else as the provider gave it.
async fn resolve_references(engine: &Engine, run: &ClaimedRun) -> Result<Value, Transition> {
    /// How long a run made due before its dependencies succeeded waits.
    const NOT_READY_WAIT: std::time::Duration = std::time::Duration::from_secs(30);
    /// A database error here: try again shortly (nothing was sent).
    const DATABASE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
    let mut ids: Vec<i64> = crate::chains::references(&run.inputs)
        .iter()
        .map(|r| r.run)
        .chain(run.depends_on.iter().copied())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    let dependencies = match store::dependency_outputs(&engine.pool, &ids).await {
        Ok(dependencies) => dependencies,
        Err(e) => {
            tracing::warn!(error = %e, "could not read the outputs this run takes; trying again shortly");
            return Err(lifecycle::throttled(run.state, DATABASE_WAIT, Utc::now()));
        }
    };
    /// How long after a dependency finished the copies of its media
    /// outputs are waited for (a mirror that takes longer is passed by:
    /// the provider's URL is sent).
    const MIRROR_WAIT: std::time::Duration = std::time::Duration::from_secs(120);
    let storage = engine.uploads.storage();
    let in_store = |location: &str| storage.as_ref().and_then(|s| s.relative_of(location).ok());
    let store = storage.as_ref().map(|_| crate::chains::Store {
        stored: &in_store,
        mirror_wait: MIRROR_WAIT,
    });
    crate::chains::check_dependencies(&run.depends_on, &dependencies)
        .and_then(|()| crate::chains::resolve(&run.inputs, &dependencies, store.as_ref()))
        .map_err(|why| {
            if matches!(why, crate::chains::Unresolved::MirrorPending { .. }) {
                tracing::info!(reason = %why, "waiting for the stored copy of an input");
            } else {
                tracing::warn!(reason = %why, "a chained run's inputs cannot be resolved");
            }
            lifecycle::unresolved_inputs(&why, NOT_READY_WAIT, Utc::now())
        })
}

/// Reads the manifest and checks `inputs` (the run's, file values set aside).
async fn check_inputs(
    engine: &Engine,
    run: &ClaimedRun,
    profile: &crate::runtime::Profile,
    inputs: &Value,
) -> Result<Prepared, Transition> {
    let manifest = engine
        .manifests
        .get(
            &run.provider,
            &profile.client,
            &run.workflow_id,
            profile.manifest_ttl,
        )
        .await;
    if let Err(crate::providers::ManifestError::Unclear(u)) = &manifest
        && u.account_refused
    {
        engine
            .provider_refused_key(&run.provider, &run.workflow_id, &u.reason)
            .await;
    }
    let manifest = manifest.map_err(|e| {
        lifecycle::manifest_failed(
            &progress(run),
            &run.workflow_id,
            &e,
            &engine.submit,
            Utc::now(),
            unit(),
        )
    })?;
    let inputs = match inputs {
        Value::Object(inputs) => inputs,
        // The CHECK constraint rules this out; fail the row, not the worker.
        other => {
            return Err(lifecycle::reject_inputs(
                &crate::inputs::InputError::WrongType {
                    key: "(inputs)".into(),
                    expected: "a JSON object".into(),
                    got: other.to_string(),
                },
            ));
        }
    };
    // market/info describes only the published revision. A run pinned to
    // another one is sent as the producer wrote it: checking it against a
    // manifest it does not follow could refuse a valid run, and the provider
    // still validates (its refusal fails the run with its own code).
    // Consent is checked after the inputs, so a run with both problems
    // reports the input problem (the one the producer must fix in the data).
    let Some(manifest) = manifest else {
        // No manifest to check against (GPTBots): the provider validates.
        crate::inputs::check_size(inputs).map_err(|e| lifecycle::reject_inputs(&e))?;
        return Ok(Prepared {
            revision_id: run.revision_id.clone(),
            sent_inputs: inputs.clone(),
            quote: None,
        });
    };
    let quote = Some(Quote {
        amount: manifest.quote_amount,
        currency: manifest.currency.clone(),
    });
    let lacks_consent = manifest.may_incur_external_cost && !run.accept_external_cost_risk;
    if let Some(pinned) = &run.revision_id
        && Some(pinned) != manifest.revision_id.as_ref()
    {
        crate::inputs::check_size(inputs).map_err(|e| lifecycle::reject_inputs(&e))?;
        if lacks_consent {
            return Err(lifecycle::external_cost_not_accepted(&run.workflow_id));
        }
        tracing::info!(pinned = %pinned, published = ?manifest.revision_id, "run pins an unpublished revision; inputs sent unchecked");
        return Ok(Prepared {
            revision_id: Some(pinned.clone()),
            sent_inputs: inputs.clone(),
            quote,
        });
    }
    let sent = complete_inputs(&manifest, inputs).map_err(|e| lifecycle::reject_inputs(&e))?;
    if lacks_consent {
        return Err(lifecycle::external_cost_not_accepted(&run.workflow_id));
    }
    Ok(Prepared {
        revision_id: run.revision_id.clone().or(manifest.revision_id.clone()),
        sent_inputs: sent,
        quote,
    })
}
