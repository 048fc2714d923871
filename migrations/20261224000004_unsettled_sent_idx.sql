-- no-transaction
-- The spend guard's index of unsettled money (runs_unsettled_idx) held
-- every run not `queued`, so chained runs `waiting` for their
-- dependencies (which hold no money) were read by every spend check of
-- their profile: 10,000 waiting runs, 10,000 rows per check. This one
-- leaves them out too; the spend guard and the outstanding-frozen gauge
-- ask for `state NOT IN ('waiting', 'queued')`. Built CONCURRENTLY so an
-- upgrade never blocks writers. The old index stays in this release:
-- workers of the previous release, still running during a rolling
-- upgrade, read it; a later release drops it (see README, Upgrading).
CREATE INDEX CONCURRENTLY IF NOT EXISTS runs_unsettled_sent_idx ON wfq.runs (provider)
    WHERE settled_at IS NULL AND state NOT IN ('waiting', 'queued');
