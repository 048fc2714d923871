-- no-transaction
-- The runs that wait for a given run (`depends_on @> ARRAY[id]`): looked
-- up when a run finishes, to release or fail what waits for it. Only
-- chained runs are in it. Built CONCURRENTLY so an upgrade never blocks
-- writers.
CREATE INDEX CONCURRENTLY IF NOT EXISTS runs_depends_on_idx
    ON wfq.runs USING gin (depends_on)
    WHERE depends_on IS NOT NULL;
