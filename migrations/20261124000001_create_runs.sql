-- The queue of record. Producers INSERT here from any language; wfq workers
-- claim due rows with per-run leases and write every fact back.
CREATE SCHEMA IF NOT EXISTS wfq;

CREATE TABLE wfq.runs (
    -- request: written by the producer
    id                        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    provider                  text        NOT NULL DEFAULT 'chenyu',
    workflow_id               text        NOT NULL,
    revision_id               text,
    inputs                    jsonb       NOT NULL DEFAULT '{}'::jsonb,
    idempotency_key           text        NOT NULL DEFAULT gen_random_uuid()::text,
    accept_external_cost_risk boolean     NOT NULL DEFAULT false,
    priority                  integer     NOT NULL DEFAULT 0,
    not_before                timestamptz,
    metadata                  jsonb,
    retry_of                  bigint      REFERENCES wfq.runs (id) ON DELETE SET NULL,

    -- lifecycle: written by wfq
    state                     text        NOT NULL DEFAULT 'queued',
    attempts                  integer     NOT NULL DEFAULT 0,
    polls                     integer     NOT NULL DEFAULT 0,
    due_at                    timestamptz NOT NULL DEFAULT now(),
    lease_owner               text,
    lease_expires_at          timestamptz,
    version                   bigint      NOT NULL DEFAULT 0,
    created_at                timestamptz NOT NULL DEFAULT now(),
    submitted_at              timestamptz,
    finished_at               timestamptz,
    settled_at                timestamptz,
    updated_at                timestamptz NOT NULL DEFAULT now(),
    -- the inputs as actually sent: the producer's plus the manifest's defaults
    sent_inputs               jsonb,

    -- provider facts, verbatim
    provider_run_id           text,
    task_id                   text,
    prompt_id                 text,
    billing_run_id            text,
    run_status                text,
    freeze_status             text,
    submission_status         text,
    settlement_status         text,
    outputs                   jsonb,

    -- money: exact decimals, never float
    currency                  text,
    quote_amount              numeric,
    frozen_amount             numeric,
    final_amount              numeric,
    released_amount           numeric,
    compute_cost              numeric,
    external_model_cost       numeric,
    total_cost                numeric,

    -- errors
    error_code                text,
    error_message             text,
    error_detail              jsonb,

    -- Refuse what can never run, at INSERT time, with a message naming the column.
    CONSTRAINT runs_provider_not_empty CHECK (length(btrim(provider)) > 0),
    CONSTRAINT runs_workflow_id_not_empty CHECK (length(btrim(workflow_id)) > 0),
    CONSTRAINT runs_workflow_id_length CHECK (length(workflow_id) <= 200),
    CONSTRAINT runs_inputs_is_object CHECK (jsonb_typeof(inputs) = 'object'),
    CONSTRAINT runs_idempotency_key_length CHECK (length(idempotency_key) BETWEEN 1 AND 255),
    CONSTRAINT runs_priority_range CHECK (priority BETWEEN -1000 AND 1000),
    CONSTRAINT runs_state_known CHECK (state IN ('queued', 'submitting', 'running', 'succeeded', 'failed', 'canceled')),
    CONSTRAINT runs_idempotency_key_unique UNIQUE (provider, idempotency_key)
);

COMMENT ON TABLE wfq.runs IS 'wfq run requests and their lifecycle; INSERT to enqueue, SELECT to read results';
COMMENT ON COLUMN wfq.runs.idempotency_key IS 'sent unchanged on every submit of this run; never changes';
COMMENT ON COLUMN wfq.runs.version IS 'bumped on every wfq write; workers compare-and-set on it';

-- The claim query walks only active rows in due order.
CREATE INDEX runs_due_idx ON wfq.runs (due_at) WHERE state IN ('queued', 'submitting', 'running');
CREATE INDEX runs_state_idx ON wfq.runs (state, id);
CREATE INDEX runs_retry_of_idx ON wfq.runs (retry_of) WHERE retry_of IS NOT NULL;

-- Append-only audit trail: every transition and every provider answer.
CREATE TABLE wfq.run_events (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id     bigint      NOT NULL REFERENCES wfq.runs (id) ON DELETE CASCADE,
    at         timestamptz NOT NULL DEFAULT now(),
    kind       text        NOT NULL,
    from_state text,
    to_state   text,
    worker     text,
    detail     jsonb
);
CREATE INDEX run_events_run_idx ON wfq.run_events (run_id, id);

-- One notification per INSERT statement, not per row: a per-row notify
-- serialises bulk enqueues on the notification queue.
CREATE FUNCTION wfq.notify_runs_inserted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('wfq_runs_due', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER runs_inserted_notify
    AFTER INSERT ON wfq.runs
    FOR EACH STATEMENT EXECUTE FUNCTION wfq.notify_runs_inserted();

-- Producers LISTEN wfq_run_finished instead of polling the table. Only final
-- transitions fire, so the per-row cost is paid once per run.
CREATE FUNCTION wfq.notify_run_finished() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('wfq_run_finished', NEW.id::text);
    RETURN NULL;
END;
$$;

CREATE TRIGGER runs_finished_notify
    AFTER UPDATE OF state ON wfq.runs
    FOR EACH ROW
    WHEN (NEW.state IN ('succeeded', 'failed', 'canceled') AND OLD.state IS DISTINCT FROM NEW.state)
    EXECUTE FUNCTION wfq.notify_run_finished();

-- `not_before` is folded into `due_at` when a row arrives, so the claim query
-- and the "when is the next run due" query read a single indexed column.
CREATE FUNCTION wfq.apply_not_before() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.due_at := GREATEST(NEW.due_at, NEW.not_before);
    RETURN NEW;
END;
$$;

-- WHEN keeps the common case (no not_before) free of a function call.
CREATE TRIGGER runs_not_before_on_insert
    BEFORE INSERT ON wfq.runs
    FOR EACH ROW
    WHEN (NEW.not_before IS NOT NULL)
    EXECUTE FUNCTION wfq.apply_not_before();

-- The claim walks active runs in the order it hands them out.
CREATE INDEX runs_claim_idx ON wfq.runs (priority DESC, due_at, id)
    WHERE state IN ('queued', 'submitting', 'running');

-- A run's idempotency key never changes, and neither do its provider and
-- workflow once a worker may have acted on them: a retried submit under
-- another key, or to another provider, would be a second charge.
CREATE FUNCTION wfq.guard_run_identity() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.idempotency_key IS DISTINCT FROM OLD.idempotency_key THEN
        RAISE EXCEPTION 'wfq.runs %: idempotency_key cannot change (it is sent on every submit of this run)', OLD.id
            USING ERRCODE = 'check_violation';
    END IF;
    IF (OLD.state <> 'queued' OR OLD.lease_owner IS NOT NULL OR OLD.sent_inputs IS NOT NULL)
       AND (NEW.provider IS DISTINCT FROM OLD.provider OR NEW.workflow_id IS DISTINCT FROM OLD.workflow_id) THEN
        RAISE EXCEPTION 'wfq.runs %: provider and workflow_id cannot change once a worker has taken the run (state %)', OLD.id, OLD.state
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER runs_guard_identity
    BEFORE UPDATE OF idempotency_key, provider, workflow_id ON wfq.runs
    FOR EACH ROW
    EXECUTE FUNCTION wfq.guard_run_identity();

-- Provider profiles a worker paused because the provider refused its API key
-- (401/403). Their runs stay where they are until a probe succeeds; this
-- table is how `wfq list` and operators see it.
CREATE TABLE wfq.provider_pauses (
    profile   text        PRIMARY KEY,
    paused_at timestamptz NOT NULL DEFAULT now(),
    worker    text        NOT NULL,
    reason    text        NOT NULL
);
