-- Completion callbacks: a producer may give a run a `callback_url`; once the
-- run is final (succeeded, failed, canceled) a worker POSTs the run there as
-- signed JSON, retried on a schedule stored here until a 2xx or a limit.

ALTER TABLE wfq.runs
    -- request: written by the producer
    ADD COLUMN callback_url text,
    -- delivery: written by wfq. NULL: no callback (none requested, or the run
    -- is not final yet); pending: due at callback_due_at; delivered: a 2xx
    -- arrived; failed: given up (max_attempts, or the receiver answered 410).
    ADD COLUMN callback_state text,
    ADD COLUMN callback_attempts integer NOT NULL DEFAULT 0,
    ADD COLUMN callback_due_at timestamptz,
    ADD COLUMN callback_lease_owner text,
    ADD COLUMN callback_lease_expires_at timestamptz,
    ADD COLUMN callback_finished_at timestamptz,
    ADD CONSTRAINT runs_callback_url_http CHECK (
        callback_url IS NULL OR callback_url ~* '^https?://[^\s/?#]+([/?#]\S*)?$'),
    ADD CONSTRAINT runs_callback_url_length CHECK (length(callback_url) <= 2048),
    ADD CONSTRAINT runs_callback_state_known CHECK (
        callback_state IN ('pending', 'delivered', 'failed'));

COMMENT ON COLUMN wfq.runs.callback_url IS
    'POSTed the run as signed JSON once it is final (http or https, at most 2048 characters)';
COMMENT ON COLUMN wfq.runs.callback_state IS
    'NULL (no callback due), pending, delivered (a 2xx arrived) or failed (given up)';

-- The delivery claim walks due callbacks only.
CREATE INDEX runs_callback_due_idx ON wfq.runs (callback_due_at, id)
    WHERE callback_state = 'pending';

-- Every HTTP request sent to a callback_url, with what came back. A table of
-- its own rather than wfq.run_events: attempts are typed (status, duration)
-- so that "which receivers fail, how slowly" is a plain GROUP BY, and a
-- receiver that is down for hours does not bury a run's lifecycle trail.
-- run_events gets one `callback_delivered` or `callback_failed` entry at the end.
CREATE TABLE wfq.callback_attempts (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id          bigint      NOT NULL REFERENCES wfq.runs (id) ON DELETE CASCADE,
    attempt         integer     NOT NULL,
    worker          text        NOT NULL,
    started_at      timestamptz NOT NULL,
    duration_ms     integer     NOT NULL,
    -- the receiver's HTTP status, or NULL when no answer arrived (then `error`)
    http_status     integer,
    error           text,
    -- delivered | retry | exhausted (max_attempts reached) | gone (410) |
    -- invalid_url (the URL cannot be requested at all)
    result          text        NOT NULL,
    -- when the next attempt is due (result = retry)
    next_attempt_at timestamptz,
    CONSTRAINT callback_attempts_result_known CHECK (
        result IN ('delivered', 'retry', 'exhausted', 'gone', 'invalid_url'))
);
CREATE INDEX callback_attempts_run_idx ON wfq.callback_attempts (run_id, id);

-- A run that becomes final with a callback_url makes its callback due. A
-- trigger covers every path that finishes a run (worker steps, `wfq cancel`,
-- SQL by hand). A run that becomes final again (after `wfq retry` resumed it
-- in place) gets a fresh delivery; clearing the lease makes a delivery of the
-- older state that is still in flight lose its compare-and-set.
CREATE FUNCTION wfq.arm_callback() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.callback_state := 'pending';
    NEW.callback_attempts := 0;
    NEW.callback_due_at := now();
    NEW.callback_lease_owner := NULL;
    NEW.callback_lease_expires_at := NULL;
    NEW.callback_finished_at := NULL;
    RETURN NEW;
END;
$$;

CREATE TRIGGER runs_callback_arm
    BEFORE UPDATE OF state ON wfq.runs
    FOR EACH ROW
    WHEN (NEW.state IN ('succeeded', 'failed', 'canceled') AND OLD.state IS DISTINCT FROM NEW.state
          AND NEW.callback_url IS NOT NULL)
    EXECUTE FUNCTION wfq.arm_callback();

CREATE TRIGGER runs_callback_arm_on_insert
    BEFORE INSERT ON wfq.runs
    FOR EACH ROW
    WHEN (NEW.state IN ('succeeded', 'failed', 'canceled') AND NEW.callback_url IS NOT NULL)
    EXECUTE FUNCTION wfq.arm_callback();
