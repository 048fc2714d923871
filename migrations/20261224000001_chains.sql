-- Chains of runs (issue 17): a run that waits for other runs to succeed
-- and takes their outputs as inputs.
--
--   depends_on             the runs this one waits for (ids); every
--                          {"$output": {"run": ID, "key": "..."}} value in
--                          `inputs` (at any depth) adds its run here.
--   on_dependency_failure  fail (default): a dependency that fails or is
--                          canceled fails this run DEPENDENCY_FAILED;
--                          cancel: it cancels this run instead.
--   state 'waiting'        a run whose dependencies have not all succeeded.
--                          No claim, poll or lane index ever reads it: the
--                          claim indexes cover queued, submitting and
--                          running only. It becomes `queued` (due now) in
--                          the transaction that finishes its last
--                          dependency, or fails/cancels with its whole
--                          waiting chain below it in the transaction that
--                          fails one.
--
-- Upgrade-safe like 20261202000001: nullable or constant-default columns
-- (no rewrite), the state CHECK replaced NOT VALID (validated by
-- 20261224000003 without blocking writers), new functions and triggers,
-- a short lock_timeout (`wfq migrate` tries again).
SET LOCAL lock_timeout = '500ms';

ALTER TABLE wfq.runs
    ADD COLUMN IF NOT EXISTS depends_on bigint[],
    ADD COLUMN IF NOT EXISTS on_dependency_failure text NOT NULL DEFAULT 'fail';

ALTER TABLE wfq.runs DROP CONSTRAINT IF EXISTS runs_on_dependency_failure_known;
ALTER TABLE wfq.runs ADD CONSTRAINT runs_on_dependency_failure_known
    CHECK (on_dependency_failure IN ('fail', 'cancel')) NOT VALID;
ALTER TABLE wfq.runs DROP CONSTRAINT IF EXISTS runs_depends_on_size;
ALTER TABLE wfq.runs ADD CONSTRAINT runs_depends_on_size
    CHECK (cardinality(depends_on) <= 1000) NOT VALID;

-- A superset of the old list: every existing row satisfies it.
ALTER TABLE wfq.runs DROP CONSTRAINT IF EXISTS runs_state_known;
ALTER TABLE wfq.runs ADD CONSTRAINT runs_state_known
    CHECK (state IN ('waiting', 'queued', 'submitting', 'running', 'succeeded', 'failed', 'canceled')) NOT VALID;

COMMENT ON COLUMN wfq.runs.depends_on IS
    'runs that must succeed before this one is submitted (and every run an {"$output": ...} input names)';
COMMENT ON COLUMN wfq.runs.on_dependency_failure IS
    'fail (DEPENDENCY_FAILED) or cancel: what a failed or canceled dependency does to this run';

-- Every {"$output": {"run": ID, "key": "KEY"}} value in `doc`, with where
-- it sits (`at`, for messages: inputs.image, inputs.frames.0). A value
-- with a `$output` member of any other shape is refused, naming where.
CREATE OR REPLACE FUNCTION wfq.output_refs(doc jsonb, at text DEFAULT 'inputs')
RETURNS TABLE (run bigint, key text, path text)
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    member text;
    item jsonb;
    ref jsonb;
    i integer;
BEGIN
    IF jsonb_typeof(doc) = 'object' THEN
        IF doc ? '$output' THEN
            ref := doc -> '$output';
            IF (SELECT count(*) FROM jsonb_object_keys(doc)) <> 1
               OR jsonb_typeof(ref) IS DISTINCT FROM 'object'
               OR jsonb_typeof(ref -> 'run') IS DISTINCT FROM 'number'
               OR jsonb_typeof(ref -> 'key') IS DISTINCT FROM 'string' THEN
                RAISE EXCEPTION 'wfq.runs: %: an output reference is {"$output": {"run": <run id>, "key": "<output key>"}}, got %', at, doc
                    USING ERRCODE = 'check_violation';
            END IF;
            IF (ref ->> 'run')::numeric <> trunc((ref ->> 'run')::numeric)
               OR (ref ->> 'run')::numeric NOT BETWEEN 1 AND 9223372036854775807
               OR length(ref ->> 'key') = 0
               OR (SELECT count(*) FROM jsonb_object_keys(ref)) <> 2 THEN
                RAISE EXCEPTION 'wfq.runs: %: an output reference is {"$output": {"run": <run id>, "key": "<output key>"}}, got %', at, doc
                    USING ERRCODE = 'check_violation';
            END IF;
            run := (ref ->> 'run')::bigint;
            key := ref ->> 'key';
            path := at;
            RETURN NEXT;
            RETURN;
        END IF;
        FOR member, item IN SELECT * FROM jsonb_each(doc) LOOP
            RETURN QUERY SELECT * FROM wfq.output_refs(item, at || '.' || member);
        END LOOP;
    ELSIF jsonb_typeof(doc) = 'array' THEN
        FOR i IN 0 .. jsonb_array_length(doc) - 1 LOOP
            RETURN QUERY SELECT * FROM wfq.output_refs(doc -> i, at || '.' || i);
        END LOOP;
    END IF;
END;
$$;
COMMENT ON FUNCTION wfq.output_refs(jsonb, text) IS
    'the {"$output": {"run": ID, "key": KEY}} references in an inputs document, with where each sits';

-- `inputs` with every reference to run `old_run` pointed at `new_run`
-- (`wfq retry` of a chain's run as a new row).
CREATE OR REPLACE FUNCTION wfq.repoint_output_refs(doc jsonb, old_run bigint, new_run bigint)
RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF jsonb_typeof(doc) = 'object' THEN
        IF doc ? '$output' AND (doc #>> '{$output,run}') = old_run::text THEN
            RETURN jsonb_set(doc, '{$output,run}', to_jsonb(new_run));
        END IF;
        RETURN (SELECT coalesce(jsonb_object_agg(e.key, wfq.repoint_output_refs(e.value, old_run, new_run)), '{}'::jsonb)
                FROM jsonb_each(doc) e);
    ELSIF jsonb_typeof(doc) = 'array' THEN
        RETURN (SELECT coalesce(jsonb_agg(wfq.repoint_output_refs(e.value, old_run, new_run) ORDER BY e.n), '[]'::jsonb)
                FROM jsonb_array_elements(doc) WITH ORDINALITY AS e(value, n));
    END IF;
    RETURN doc;
END;
$$;

-- BEFORE INSERT, and BEFORE UPDATE OF depends_on or inputs: completes
-- depends_on with the runs `$output` values name, refuses what can never
-- run (a missing run, itself, a cycle, a key a succeeded run does not
-- have), and makes the run `waiting` while a dependency has not
-- succeeded. A dependency that failed already is dealt with at commit
-- (wfq.settle_waiting), like one that finishes meanwhile.
CREATE OR REPLACE FUNCTION wfq.plan_dependencies() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    deps bigint[];
    missing bigint;
    cycle bigint[];
    bad record;
    unfinished bigint[];
BEGIN
    IF TG_OP = 'UPDATE' THEN
        IF NEW.depends_on IS NOT DISTINCT FROM OLD.depends_on
           AND NEW.inputs IS NOT DISTINCT FROM OLD.inputs THEN
            RETURN NEW;
        END IF;
        IF NOT (NEW.state = 'waiting'
                OR (NEW.state = 'queued' AND NEW.lease_owner IS NULL AND NEW.sent_inputs IS NULL)) THEN
            RAISE EXCEPTION 'wfq.runs %: inputs and depends_on cannot change once a worker may have taken the run (state %)', NEW.id, NEW.state
                USING ERRCODE = 'check_violation';
        END IF;
    END IF;

    IF array_position(NEW.depends_on, NULL) IS NOT NULL THEN
        RAISE EXCEPTION 'wfq.runs %: depends_on holds a NULL', NEW.id USING ERRCODE = 'check_violation';
    END IF;
    SELECT array_agg(d ORDER BY d) INTO deps
    FROM (SELECT unnest(NEW.depends_on) AS d
          UNION
          SELECT r.run FROM wfq.output_refs(NEW.inputs) r) x;
    NEW.depends_on := deps;
    IF deps IS NULL THEN
        IF NEW.state = 'waiting' THEN
            NEW.state := 'queued';
            NEW.due_at := GREATEST(now(), NEW.not_before);
            NEW.hold_reason := NULL;
        END IF;
        RETURN NEW;
    END IF;

    IF NEW.id = ANY (deps) THEN
        RAISE EXCEPTION 'wfq.runs %: a run cannot depend on itself (depends_on or an $output input names run %)', NEW.id, NEW.id
            USING ERRCODE = 'check_violation';
    END IF;
    SELECT d INTO missing FROM unnest(deps) d
    WHERE NOT EXISTS (SELECT 1 FROM wfq.runs r WHERE r.id = d) LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'wfq.runs %: depends on run %, which does not exist', NEW.id, missing
            USING ERRCODE = 'foreign_key_violation';
    END IF;

    -- A new row cannot close a cycle (nothing names it yet); a changed one
    -- can. The graph without this row is acyclic, so the walk up from the
    -- new dependencies ends; it stops at this row, whose stored
    -- depends_on is the old one.
    IF TG_OP = 'UPDATE' AND EXISTS (
        WITH RECURSIVE up(id) AS (
            SELECT unnest(deps)
            UNION
            SELECT p FROM up JOIN wfq.runs r ON r.id = up.id AND up.id <> NEW.id
            CROSS JOIN LATERAL unnest(r.depends_on) p
        )
        SELECT 1 FROM up WHERE id = NEW.id
    ) THEN
        WITH RECURSIVE walk(id, path) AS (
            SELECT d, ARRAY[NEW.id, d] FROM unnest(deps) d
            UNION ALL
            SELECT p, walk.path || p FROM walk JOIN wfq.runs r ON r.id = walk.id AND walk.id <> NEW.id
            CROSS JOIN LATERAL unnest(r.depends_on) p
        )
        SELECT path INTO cycle FROM walk WHERE id = NEW.id LIMIT 1;
        RAISE EXCEPTION 'wfq.runs %: depends_on would make a cycle: %', NEW.id,
            array_to_string(ARRAY(SELECT 'run ' || x FROM unnest(cycle) x), ' -> ')
            USING ERRCODE = 'check_violation';
    END IF;

    SELECT r.run, r.key, r.path, d.outputs INTO bad
    FROM wfq.output_refs(NEW.inputs) r JOIN wfq.runs d ON d.id = r.run
    WHERE d.state = 'succeeded' AND NOT (coalesce(d.outputs, '{}'::jsonb) ? r.key)
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'wfq.runs %: %: run % has no output %; its outputs are: %', NEW.id, bad.path, bad.run,
            quote_ident(bad.key),
            coalesce((SELECT string_agg(k, ', ' ORDER BY k)
                      FROM jsonb_object_keys(CASE WHEN jsonb_typeof(bad.outputs) = 'object' THEN bad.outputs ELSE '{}'::jsonb END) k),
                     '(none)')
            USING ERRCODE = 'check_violation';
    END IF;

    IF NEW.state IN ('queued', 'waiting') THEN
        SELECT array_agg(r.id ORDER BY r.id) INTO unfinished
        FROM wfq.runs r WHERE r.id = ANY (deps) AND r.state <> 'succeeded';
        IF unfinished IS NOT NULL THEN
            NEW.state := 'waiting';
            NEW.hold_reason := 'waiting_for: ' || array_to_string(ARRAY(SELECT 'run ' || x FROM unnest(unfinished) x), ', ');
        ELSIF NEW.state = 'waiting' THEN
            NEW.state := 'queued';
            NEW.due_at := GREATEST(now(), NEW.not_before);
            NEW.hold_reason := NULL;
        END IF;
    END IF;
    RETURN NEW;
END;
$$;

DROP TRIGGER IF EXISTS runs_plan_dependencies ON wfq.runs;
CREATE TRIGGER runs_plan_dependencies
    BEFORE INSERT ON wfq.runs
    FOR EACH ROW
    -- Plain runs pay one text search of their inputs, no function call.
    WHEN (NEW.depends_on IS NOT NULL OR strpos(NEW.inputs::text, '"$output"') > 0)
    EXECUTE FUNCTION wfq.plan_dependencies();

DROP TRIGGER IF EXISTS runs_plan_dependencies_on_update ON wfq.runs;
CREATE TRIGGER runs_plan_dependencies_on_update
    BEFORE UPDATE OF depends_on, inputs ON wfq.runs
    FOR EACH ROW
    WHEN (NEW.depends_on IS DISTINCT FROM OLD.depends_on OR NEW.inputs IS DISTINCT FROM OLD.inputs)
    EXECUTE FUNCTION wfq.plan_dependencies();

-- What made run `dep` fail or be canceled, first: itself, or (for a run
-- that failed DEPENDENCY_FAILED) the run its failure came from.
CREATE OR REPLACE FUNCTION wfq.failure_cause(dep bigint) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN error_code = 'DEPENDENCY_FAILED' AND error_detail ? 'root'
                THEN jsonb_build_object('root', error_detail -> 'root', 'root_state', error_detail -> 'root_state',
                                        'root_error_code', error_detail -> 'root_error_code')
                ELSE jsonb_build_object('root', id, 'root_state', state, 'root_error_code', error_code)
           END
    FROM wfq.runs WHERE id = dep
$$;

-- "run 41, which this run depends on, failed (ENGINE_EXECUTION_FAILED)";
-- "run 42, which this run depends on, did not run: run 41 failed (...)".
CREATE OR REPLACE FUNCTION wfq.dependency_failure_message(dep bigint, cause jsonb) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT format('run %s, which this run depends on, %s%s%s', dep,
                  CASE WHEN (cause ->> 'root')::bigint = dep THEN cause ->> 'root_state'
                       ELSE format('did not run: run %s %s', cause ->> 'root', cause ->> 'root_state') END,
                  CASE WHEN cause ->> 'root_error_code' IS NOT NULL THEN format(' (%s)', cause ->> 'root_error_code') ELSE '' END,
                  '')
$$;

-- Fails (or cancels, per its on_dependency_failure) every waiting run
-- below `failed_run`, all in one statement (a chain of any length, no
-- trigger recursion), each with an event naming the dependency it waited
-- for and the run whose failure came first. Nothing was sent for them:
-- their money is final (none).
CREATE OR REPLACE FUNCTION wfq.fail_waiting_chain(failed_run bigint) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    cause jsonb := wfq.failure_cause(failed_run);
    done integer;
BEGIN
    WITH RECURSIVE below(id, parent) AS (
        SELECT c.id, failed_run FROM wfq.runs c
        WHERE c.depends_on @> ARRAY[failed_run] AND c.state = 'waiting'
        UNION
        SELECT c.id, b.id FROM below b
        JOIN wfq.runs c ON c.depends_on @> ARRAY[b.id] AND c.state = 'waiting'
    ),
    firsts AS (
        SELECT DISTINCT ON (id) id, parent FROM below ORDER BY id, parent
    ),
    ended AS (
        UPDATE wfq.runs c
        SET state = CASE c.on_dependency_failure WHEN 'cancel' THEN 'canceled' ELSE 'failed' END,
            error_code = 'DEPENDENCY_FAILED',
            error_message = wfq.dependency_failure_message(f.parent, cause),
            error_detail = cause || jsonb_build_object('dependency', f.parent),
            finished_at = now(), settled_at = now(), hold_reason = NULL,
            lease_owner = NULL, lease_expires_at = NULL,
            version = c.version + 1, updated_at = now()
        FROM firsts f
        WHERE c.id = f.id AND c.state = 'waiting'
        RETURNING c.id, c.state, f.parent
    ),
    events AS (
        INSERT INTO wfq.run_events (run_id, kind, from_state, to_state, detail)
        SELECT e.id, 'dependency_failed', 'waiting', e.state,
               cause || jsonb_build_object('dependency', e.parent)
        FROM ended e
    )
    SELECT count(*) INTO done FROM ended;
    RETURN done;
END;
$$;

-- Decides a waiting run whose dependencies may all be over: released
-- (queued, due now) when every one succeeded and has the outputs it
-- names; failed DEPENDENCY_OUTPUT_MISSING when one lacks a named output;
-- failed or canceled (with the chain below) when one failed or was
-- canceled. The caller holds a lock that serialises this decision with
-- the finish of its dependencies (see the callers).
CREATE OR REPLACE FUNCTION wfq.decide_waiting(target bigint) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    c record;
    broken record;
    lacking record;
    unfinished bigint[];
BEGIN
    SELECT id, state, depends_on, inputs, on_dependency_failure, not_before, hold_reason
    INTO c FROM wfq.runs WHERE id = target;
    IF NOT FOUND OR c.state <> 'waiting' THEN
        RETURN NULL;
    END IF;
    SELECT d.id, wfq.failure_cause(d.id) AS cause INTO broken
    FROM wfq.runs d WHERE d.id = ANY (c.depends_on) AND d.state IN ('failed', 'canceled')
    ORDER BY d.id LIMIT 1;
    IF FOUND THEN
        -- Its own trigger (release_dependents) fails the chain below it.
        WITH ended AS (
            UPDATE wfq.runs
            SET state = CASE on_dependency_failure WHEN 'cancel' THEN 'canceled' ELSE 'failed' END,
                error_code = 'DEPENDENCY_FAILED',
                error_message = wfq.dependency_failure_message(broken.id, broken.cause),
                error_detail = broken.cause || jsonb_build_object('dependency', broken.id),
                finished_at = now(), settled_at = now(), hold_reason = NULL,
                version = version + 1, updated_at = now()
            WHERE id = target
            RETURNING id, state
        )
        INSERT INTO wfq.run_events (run_id, kind, from_state, to_state, detail)
        SELECT id, 'dependency_failed', 'waiting', state,
               broken.cause || jsonb_build_object('dependency', broken.id)
        FROM ended;
        RETURN 'failed';
    END IF;
    SELECT array_agg(d.id ORDER BY d.id) INTO unfinished
    FROM wfq.runs d WHERE d.id = ANY (c.depends_on) AND d.state <> 'succeeded';
    IF unfinished IS NOT NULL THEN
        -- Still waiting: its reason names what is left.
        UPDATE wfq.runs
        SET hold_reason = 'waiting_for: ' || array_to_string(ARRAY(SELECT 'run ' || x FROM unnest(unfinished) x), ', ')
        WHERE id = target AND hold_reason IS DISTINCT FROM
              'waiting_for: ' || array_to_string(ARRAY(SELECT 'run ' || x FROM unnest(unfinished) x), ', ');
        RETURN 'waiting';
    END IF;
    SELECT r.run, r.key, r.path INTO lacking
    FROM wfq.output_refs(c.inputs) r JOIN wfq.runs d ON d.id = r.run
    WHERE NOT (coalesce(d.outputs, '{}'::jsonb) ? r.key)
    ORDER BY r.path LIMIT 1;
    IF FOUND THEN
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

-- AFTER a run becomes final: its waiting dependents are decided in the
-- same transaction. Each dependent's row is locked first, so that of two
-- dependencies finishing at once, the second to lock sees the first's
-- commit (a fan-in cannot be left waiting).
CREATE OR REPLACE FUNCTION wfq.release_dependents() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    dependent bigint;
BEGIN
    IF NEW.state IN ('failed', 'canceled') THEN
        PERFORM wfq.fail_waiting_chain(NEW.id);
        RETURN NULL;
    END IF;
    FOR dependent IN
        SELECT c.id FROM wfq.runs c
        WHERE c.depends_on @> ARRAY[NEW.id] AND c.state = 'waiting'
        ORDER BY c.id
        FOR NO KEY UPDATE
    LOOP
        PERFORM wfq.decide_waiting(dependent);
    END LOOP;
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS runs_release_dependents ON wfq.runs;
CREATE TRIGGER runs_release_dependents
    AFTER UPDATE OF state ON wfq.runs
    FOR EACH ROW
    WHEN (NEW.state IN ('succeeded', 'failed', 'canceled') AND OLD.state IS DISTINCT FROM NEW.state)
    EXECUTE FUNCTION wfq.release_dependents();

-- A waiting run written by this transaction (inserted, made to wait
-- again by `wfq retry`, its dependencies changed): at commit its
-- dependencies are locked FOR SHARE, in id order, and it is decided. A
-- dependency that finished before the lock is seen finished (its finish
-- committed first); one that finishes after waits for this commit, and
-- its own trigger then sees this run. Held for the commit only, so a
-- producer's long transaction never holds back a worker's finish.
CREATE OR REPLACE FUNCTION wfq.settle_waiting() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    deps bigint[];
BEGIN
    SELECT depends_on INTO deps FROM wfq.runs WHERE id = NEW.id AND state = 'waiting';
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    PERFORM 1 FROM wfq.runs WHERE id = ANY (deps) ORDER BY id FOR SHARE;
    PERFORM wfq.decide_waiting(NEW.id);
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS runs_settle_waiting ON wfq.runs;
CREATE CONSTRAINT TRIGGER runs_settle_waiting
    AFTER INSERT OR UPDATE OF state, depends_on, inputs ON wfq.runs
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW
    WHEN (NEW.state = 'waiting')
    EXECUTE FUNCTION wfq.settle_waiting();

-- `wfq retry` of a run in a chain: the runs below it that failed (or were
-- canceled) DEPENDENCY_FAILED wait again, pointed at `new_run` when the
-- retry is a new row. They never reached a provider (a DEPENDENCY_FAILED
-- run is never claimed), so they keep their ids and idempotency keys.
CREATE OR REPLACE FUNCTION wfq.resume_chain(old_run bigint, new_run bigint) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    done integer;
BEGIN
    WITH RECURSIVE below(id) AS (
        SELECT c.id FROM wfq.runs c
        WHERE c.depends_on @> ARRAY[old_run] AND c.state IN ('failed', 'canceled')
          AND c.error_code IN ('DEPENDENCY_FAILED') AND c.sent_inputs IS NULL AND c.submitted_at IS NULL
        UNION
        SELECT c.id FROM below b
        JOIN wfq.runs c ON c.depends_on @> ARRAY[b.id] AND c.state IN ('failed', 'canceled')
          AND c.error_code IN ('DEPENDENCY_FAILED') AND c.sent_inputs IS NULL AND c.submitted_at IS NULL
    ),
    resumed AS (
        UPDATE wfq.runs c
        SET state = 'waiting',
            depends_on = CASE WHEN new_run <> old_run THEN array_replace(c.depends_on, old_run, new_run) ELSE c.depends_on END,
            inputs = CASE WHEN new_run <> old_run THEN wfq.repoint_output_refs(c.inputs, old_run, new_run) ELSE c.inputs END,
            error_code = NULL, error_message = NULL, error_detail = NULL,
            finished_at = NULL, settled_at = NULL, callback_state = NULL,
            version = c.version + 1, updated_at = now()
        FROM below b
        WHERE c.id = b.id
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
COMMENT ON FUNCTION wfq.resume_chain(bigint, bigint) IS
    'wfq retry: the runs below old_run that failed DEPENDENCY_FAILED wait again (for new_run when it is a new row)';

-- Each chain, by its root (a run that depends on nothing and that others
-- depend on): its runs, where they are, what they cost and how long the
-- chain took. A run below several roots counts in each of their chains.
CREATE OR REPLACE VIEW wfq.pipeline_runs AS
WITH RECURSIVE member(root, id) AS (
    SELECT DISTINCT d, d
    FROM wfq.runs c CROSS JOIN LATERAL unnest(c.depends_on) d
    WHERE c.depends_on IS NOT NULL
      AND EXISTS (SELECT 1 FROM wfq.runs r WHERE r.id = d AND r.depends_on IS NULL)
    UNION
    SELECT m.root, c.id FROM member m JOIN wfq.runs c ON c.depends_on @> ARRAY[m.id]
)
SELECT m.root AS root_run_id,
       CASE
           WHEN bool_and(r.state = 'succeeded') THEN 'succeeded'
           WHEN bool_or(r.state IN ('waiting', 'queued', 'submitting', 'running')) THEN 'running'
           WHEN bool_or(r.state = 'failed') THEN 'failed'
           ELSE 'canceled'
       END AS state,
       count(*) AS runs,
       count(*) FILTER (WHERE r.state = 'succeeded') AS succeeded,
       count(*) FILTER (WHERE r.state = 'failed') AS failed,
       count(*) FILTER (WHERE r.state = 'canceled') AS canceled,
       count(*) FILTER (WHERE r.state = 'waiting') AS waiting,
       count(*) FILTER (WHERE r.state IN ('queued', 'submitting', 'running')) AS active,
       -- The first failure that was not a consequence of another.
       (array_agg(r.id ORDER BY r.finished_at, r.id)
            FILTER (WHERE r.state IN ('failed', 'canceled') AND r.error_code IS DISTINCT FROM 'DEPENDENCY_FAILED'))[1] AS failed_run_id,
       (array_agg(r.error_code ORDER BY r.finished_at, r.id)
            FILTER (WHERE r.state IN ('failed', 'canceled') AND r.error_code IS DISTINCT FROM 'DEPENDENCY_FAILED'))[1] AS failed_error_code,
       min(r.currency) AS currency,
       coalesce(sum(r.total_cost), 0) AS total_cost,
       coalesce(sum(r.final_amount), 0) AS final_amount,
       coalesce(sum(r.frozen_amount) FILTER (WHERE r.settled_at IS NULL), 0) AS outstanding_frozen,
       min(r.created_at) AS created_at,
       CASE WHEN bool_and(r.state IN ('succeeded', 'failed', 'canceled')) THEN max(r.finished_at) END AS finished_at,
       CASE WHEN bool_and(r.state IN ('succeeded', 'failed', 'canceled')) THEN max(r.finished_at) - min(r.created_at) END AS duration,
       array_agg(r.id ORDER BY r.id) AS run_ids
FROM member m
JOIN wfq.runs r ON r.id = m.id
GROUP BY m.root;

COMMENT ON VIEW wfq.pipeline_runs IS
    'each chain of runs by its root run: state, runs per state, the first failure, total cost and time';
