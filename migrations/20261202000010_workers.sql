-- The live fleet. Each worker process registers here and holds a
-- session-level advisory lock, (2003202305, lock_id), on a connection of its
-- own for as long as it lives: PostgreSQL drops the lock the moment that
-- session ends (the process died, or its machine dropped off and TCP
-- keepalives gave up), which is how the other workers learn, within a
-- second, that its runs need a new owner. A new table and view only: the
-- short lock_timeout is for the sequence and the catalog.
SET LOCAL lock_timeout = '2s';

CREATE SEQUENCE IF NOT EXISTS wfq.worker_lock_ids AS integer MINVALUE 1 CYCLE;

CREATE TABLE IF NOT EXISTS wfq.workers (
    -- The worker's `lease_owner` name (`worker.id`).
    id text PRIMARY KEY,
    host text NOT NULL,
    pid integer NOT NULL,
    version text NOT NULL,
    started_at timestamptz NOT NULL,
    last_seen timestamptz NOT NULL DEFAULT now(),
    profiles text[] NOT NULL DEFAULT '{}',
    concurrency integer NOT NULL,
    -- The second key of the worker's advisory lock; NULL for a worker that
    -- runs without a session of its own (`worker.session_liveness = false`,
    -- behind a transaction pooler): its runs come back when their leases end.
    lock_id integer,
    died_at timestamptz,
    -- crash: its session ended without saying goodbye; stopped: it shut down.
    died_cause text,
    CONSTRAINT workers_died_cause CHECK (died_cause IN ('crash', 'stopped')),
    CONSTRAINT workers_died_together CHECK ((died_at IS NULL) = (died_cause IS NULL)),
    CONSTRAINT workers_lock_id_unique UNIQUE (lock_id)
);

COMMENT ON TABLE wfq.workers IS 'worker processes: registered at start, marked dead by the others when their session lock is gone';
COMMENT ON COLUMN wfq.workers.lock_id IS 'second key of the session advisory lock (2003202305, lock_id) the worker holds while it lives; NULL without session liveness';
COMMENT ON COLUMN wfq.workers.died_cause IS 'crash (its session ended; its runs were made due) or stopped (graceful shutdown)';

-- Each worker, alive or not, with the runs it holds. `alive` reads the lock
-- table, not a clock: true while the worker's session holds its lock, NULL
-- for a worker without session liveness (see last_seen).
CREATE OR REPLACE VIEW wfq.workers_live AS
SELECT w.id,
       CASE WHEN w.lock_id IS NULL THEN NULL
            ELSE EXISTS (
                SELECT 1 FROM pg_catalog.pg_locks l
                WHERE l.locktype = 'advisory' AND l.granted
                  AND l.database = (SELECT d.oid FROM pg_catalog.pg_database d
                                    WHERE d.datname = current_database())
                  AND l.classid = 2003202305::oid
                  AND l.objid = w.lock_id::oid
                  AND l.objsubid = 2)
       END AS alive,
       (SELECT count(*) FROM wfq.runs r
        WHERE r.lease_owner = w.id AND r.state IN ('queued', 'submitting', 'running')) AS runs_in_hand,
       w.last_seen, w.host, w.pid, w.version, w.profiles, w.concurrency, w.started_at,
       w.died_at, w.died_cause, w.lock_id
FROM wfq.workers w;
