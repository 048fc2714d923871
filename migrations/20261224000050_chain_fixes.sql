-- Chains (issue 17), review fixes:
--
-- - A chain failed because its root failed comes back whenever the root
--   does, whatever brings it back (`wfq retry` in place, the breaker's
--   requeue of refused runs, a late accepted answer to a submit given up
--   on): a trigger on the state leaving failed/canceled, not the callers.
-- - wfq.resume_chain rechecks, in its UPDATE, that each run is still a
--   DEPENDENCY_FAILED one never sent: a second retry running at the same
--   time finds them waiting (or further) and leaves them alone.
-- - A dependency that is gone (deleted by hand, or by a prune that raced
--   an insert) is never "satisfied": the waiting run fails
--   DEPENDENCY_MISSING, when the deleting statement ends (a trigger) or
--   when it is decided (wfq.decide_waiting counts the rows it finds).
--
-- New functions and triggers only: no table lock beyond CREATE TRIGGER's
-- short SHARE ROW EXCLUSIVE, under a lock_timeout (`wfq migrate` tries
-- again).
SET LOCAL lock_timeout = '500ms';

-- As in 20261224000006, with the UPDATE itself requiring what the walk
-- chose the runs for: under READ COMMITTED a second call that walked the
-- same rows before the first committed re-reads each row it waited for,
-- and skips it unless it is still failed DEPENDENCY_FAILED and unsent.
CREATE OR REPLACE FUNCTION wfq.resume_chain(old_run bigint, new_run bigint) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    done integer;
BEGIN
    WITH RECURSIVE below(id) AS (
        SELECT c.id FROM wfq.dependents_of(old_run) d JOIN wfq.runs c ON c.id = d.id
        WHERE c.state IN ('failed', 'canceled') AND c.error_code = 'DEPENDENCY_FAILED'
          AND c.sent_inputs IS NULL AND c.submitted_at IS NULL
        UNION
        SELECT c.id FROM below b CROSS JOIN LATERAL wfq.dependents_of(b.id) d
        JOIN wfq.runs c ON c.id = d.id
        WHERE c.state IN ('failed', 'canceled') AND c.error_code = 'DEPENDENCY_FAILED'
          AND c.sent_inputs IS NULL AND c.submitted_at IS NULL
    ),
    resumed AS (
        UPDATE wfq.runs c
        SET state = 'waiting',
            depends_on = CASE WHEN new_run <> old_run THEN array_replace(c.depends_on, old_run, new_run) ELSE c.depends_on END,
            inputs = CASE WHEN new_run <> old_run THEN wfq.repoint_output_refs(c.inputs, old_run, new_run) ELSE c.inputs END,
            error_code = NULL, error_message = NULL, error_detail = NULL,
            finished_at = NULL, settled_at = NULL, callback_state = NULL,
            version = c.version + 1, updated_at = now()
        FROM below r
        WHERE c.id = r.id
          AND c.state IN ('failed', 'canceled') AND c.error_code = 'DEPENDENCY_FAILED'
          AND c.sent_inputs IS NULL AND c.submitted_at IS NULL
        RETURNING c.id
    ),
    events AS (
        INSERT INTO wfq.run_events (run_id, kind, from_state, to_state, detail)
        SELECT id, 'chain_resumed', 'failed', 'waiting',
               jsonb_build_object('retried_run', old_run, 'new_run', new_run)
        FROM resumed
    )
    SELECT count(*) INTO done FROM resumed;
    RETURN done;
END;
$$;

-- AFTER a failed or canceled run comes back (queued, submitting or
-- running): the chain below it that failed because of it waits again, in
-- the same transaction. `waiting` is left out: that is resume_chain's own
-- walk putting the runs below back, which it does for the whole chain.
CREATE OR REPLACE FUNCTION wfq.resume_revived_chain() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM wfq.resume_chain(NEW.id, NEW.id);
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS runs_resume_revived_chain ON wfq.runs;
CREATE TRIGGER runs_resume_revived_chain
    AFTER UPDATE OF state ON wfq.runs
    FOR EACH ROW
    WHEN (OLD.state IN ('failed', 'canceled') AND NEW.state IN ('queued', 'submitting', 'running'))
    EXECUTE FUNCTION wfq.resume_revived_chain();

-- As in 20261224000006, and a dependency that is not there any more (its
-- row deleted) fails the run DEPENDENCY_MISSING, naming it, before
-- anything else is looked at: it can never succeed.
CREATE OR REPLACE FUNCTION wfq.decide_waiting(target bigint) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    c record;
    d record;
    broken bigint;
    cause jsonb;
    found_ids bigint[] := '{}';
    missing bigint[];
    unfinished bigint[] := '{}';
    outputs_of jsonb := '{}';
    lacking record;
    missing_output boolean := false;
    reason text;
BEGIN
    SELECT id, state, depends_on, inputs, hold_reason INTO c
    FROM wfq.runs WHERE id = target FOR NO KEY UPDATE;
    IF NOT FOUND OR c.state <> 'waiting' THEN
        RETURN NULL;
    END IF;
    FOR d IN
        SELECT x.id, x.state, x.outputs
        FROM (SELECT r.id, r.state, r.outputs FROM wfq.runs r WHERE r.id = ANY (c.depends_on) OFFSET 0) x
        ORDER BY x.id
    LOOP
        found_ids := found_ids || d.id;
        IF d.state IN ('failed', 'canceled') AND broken IS NULL THEN
            broken := d.id;
        END IF;
        IF d.state <> 'succeeded' THEN
            unfinished := unfinished || d.id;
        END IF;
        outputs_of := outputs_of || jsonb_build_object(d.id::text, coalesce(d.outputs, '{}'::jsonb));
    END LOOP;

    SELECT array_agg(DISTINCT x ORDER BY x) INTO missing
    FROM unnest(c.depends_on) x WHERE x <> ALL (found_ids);
    IF missing IS NOT NULL THEN
        UPDATE wfq.runs
        SET state = 'failed', error_code = 'DEPENDENCY_MISSING',
            error_message = format('%s, which this run depends on, %s not exist any more (deleted)',
                                   array_to_string(ARRAY(SELECT 'run ' || x FROM unnest(missing) x), ', '),
                                   CASE WHEN cardinality(missing) = 1 THEN 'does' ELSE 'do' END),
            error_detail = jsonb_build_object('missing', to_jsonb(missing)),
            finished_at = now(), settled_at = now(), hold_reason = NULL,
            version = version + 1, updated_at = now()
        WHERE id = target;
        INSERT INTO wfq.run_events (run_id, kind, from_state, to_state, detail)
        VALUES (target, 'dependency_missing', 'waiting', 'failed',
                jsonb_build_object('missing', to_jsonb(missing),
                                   'reason', 'a run this one depends on was deleted before it succeeded'));
        RETURN 'failed';
    END IF;

    IF broken IS NOT NULL THEN
        cause := wfq.failure_cause(broken);
        UPDATE wfq.runs
        SET state = CASE on_dependency_failure WHEN 'cancel' THEN 'canceled' ELSE 'failed' END,
            error_code = 'DEPENDENCY_FAILED',
            error_message = wfq.dependency_failure_message(broken, cause),
            error_detail = cause || jsonb_build_object('dependency', broken),
            finished_at = now(), settled_at = now(), hold_reason = NULL,
            version = version + 1, updated_at = now()
        WHERE id = target
        RETURNING state INTO c.state;
        INSERT INTO wfq.run_events (run_id, kind, from_state, to_state, detail)
        VALUES (target, 'dependency_failed', 'waiting', c.state, cause || jsonb_build_object('dependency', broken));
        RETURN 'failed';
    END IF;

    IF cardinality(unfinished) > 0 THEN
        reason := 'waiting_for: ' || array_to_string(ARRAY(SELECT 'run ' || x FROM unnest(unfinished) x), ', ');
        IF c.hold_reason IS DISTINCT FROM reason THEN
            UPDATE wfq.runs SET hold_reason = reason WHERE id = target;
        END IF;
        RETURN 'waiting';
    END IF;

    IF strpos(c.inputs::text, '"$output"') > 0 THEN
        SELECT r.run, r.key, r.path INTO lacking
        FROM wfq.output_refs(c.inputs) r
        WHERE outputs_of ? r.run::text AND NOT ((outputs_of -> r.run::text) ? r.key)
        ORDER BY r.path LIMIT 1;
        missing_output := FOUND;
    END IF;
    IF missing_output THEN
        UPDATE wfq.runs
        SET state = 'failed', error_code = 'DEPENDENCY_OUTPUT_MISSING',
            error_message = format('%s: run %s succeeded without an output %s', lacking.path, lacking.run, quote_ident(lacking.key)),
            error_detail = jsonb_build_object('dependency', lacking.run, 'key', lacking.key, 'input', lacking.path),
            finished_at = now(), settled_at = now(), hold_reason = NULL,
            version = version + 1, updated_at = now()
        WHERE id = target;
        INSERT INTO wfq.run_events (run_id, kind, from_state, to_state, detail)
        VALUES (target, 'dependency_output_missing', 'waiting', 'failed',
                jsonb_build_object('dependency', lacking.run, 'key', lacking.key, 'input', lacking.path));
        RETURN 'failed';
    END IF;

    UPDATE wfq.runs
    SET state = 'queued', due_at = GREATEST(now(), not_before), hold_reason = NULL,
        version = version + 1, updated_at = now()
    WHERE id = target;
    INSERT INTO wfq.run_events (run_id, kind, from_state, to_state, detail)
    VALUES (target, 'dependencies_succeeded', 'waiting', 'queued',
            jsonb_build_object('depends_on', to_jsonb(c.depends_on)));
    PERFORM pg_notify('wfq_runs_due', '');
    RETURN 'released';
END;
$$;

-- As in 20261224000006; the commit-time shortcut is taken only when every
-- dependency is still there (one deleted by another transaction since the
-- insert read it is decided: DEPENDENCY_MISSING).
CREATE OR REPLACE FUNCTION wfq.settle_waiting() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    deps bigint[];
BEGIN
    SELECT depends_on INTO deps FROM wfq.runs WHERE id = NEW.id AND state = 'waiting';
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF (SELECT count(*) = (SELECT count(DISTINCT x) FROM unnest(deps) x)
               AND NOT bool_or(d.xmin <> pg_current_xact_id()::xid OR d.state IN ('failed', 'canceled'))
        FROM (SELECT r.xmin, r.state FROM wfq.runs r WHERE r.id = ANY (deps) OFFSET 0) d) THEN
        RETURN NULL;
    END IF;
    PERFORM 1 FROM wfq.runs WHERE id = ANY (deps) ORDER BY id FOR SHARE;
    PERFORM wfq.decide_waiting(NEW.id);
    RETURN NULL;
END;
$$;

-- AFTER a DELETE statement: the waiting runs that depended on a deleted
-- run are decided (DEPENDENCY_MISSING, and the chain below them fails by
-- its own trigger), each locked in id order. One lookup per statement
-- through runs_depends_on_idx, whatever the number of rows deleted.
CREATE OR REPLACE FUNCTION wfq.fail_dependents_of_deleted() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    gone_ids bigint[];
    dependent bigint;
BEGIN
    SELECT array_agg(id) INTO gone_ids FROM gone;
    IF gone_ids IS NULL THEN
        RETURN NULL;
    END IF;
    FOR dependent IN
        SELECT x.id
        FROM (SELECT r.id, r.state FROM wfq.runs r
              WHERE r.depends_on && gone_ids AND r.depends_on IS NOT NULL OFFSET 0) x
        WHERE x.state = 'waiting'
        ORDER BY x.id
    LOOP
        PERFORM wfq.decide_waiting(dependent);
    END LOOP;
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS runs_fail_dependents_of_deleted ON wfq.runs;
CREATE TRIGGER runs_fail_dependents_of_deleted
    AFTER DELETE ON wfq.runs
    REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT
    EXECUTE FUNCTION wfq.fail_dependents_of_deleted();
