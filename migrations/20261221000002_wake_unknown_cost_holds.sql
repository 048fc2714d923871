-- Runs held because a finished run's cost is unknown (`hold_reason`
-- `unknown_cost: ...`) wait for someone to settle that run by hand
-- (`UPDATE wfq.runs SET final_amount = ..., settled_at = now() ...`). That
-- UPDATE now makes them due at once: a trigger on the late settlement of a
-- run that had already finished. A run settled as it finishes (the usual
-- case, `finished_at` set by the same write) does not fire it.
-- Upgrade-safe: CREATE TRIGGER takes a short lock (no DROP first: that
-- would take ACCESS EXCLUSIVE), bounded like the other
-- migrations by lock_timeout (the migration is retried by `wfq migrate`).
SET LOCAL lock_timeout = '500ms';

CREATE OR REPLACE FUNCTION wfq.wake_unknown_cost_holds() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- Bounded, in due order and skipping rows others hold: no deadlock
    -- with another wake or a worker, and the settling UPDATE stays short.
    -- The runs left are woken by the finishes of these (wake_held_runs)
    -- or by their own recheck.
    UPDATE wfq.runs SET due_at = now()
    WHERE id IN (
        SELECT id FROM wfq.runs
        WHERE provider = NEW.provider AND state = 'queued'
          AND hold_reason LIKE 'unknown_cost:%' AND due_at > now() AND lease_owner IS NULL
        ORDER BY due_at
        LIMIT 1000
        FOR NO KEY UPDATE SKIP LOCKED
    );
    IF FOUND THEN
        PERFORM pg_notify('wfq_runs_due', '');
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER runs_late_settlement_wakes_holds
    AFTER UPDATE OF settled_at ON wfq.runs
    FOR EACH ROW
    WHEN (OLD.settled_at IS NULL AND NEW.settled_at IS NOT NULL
          AND OLD.finished_at IS NOT NULL)
    EXECUTE FUNCTION wfq.wake_unknown_cost_holds();
