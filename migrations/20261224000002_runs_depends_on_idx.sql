-- no-transaction
-- The runs that wait for a given run (`depends_on @> ARRAY[id]`): looked
-- up when a run finishes, to release or fail what waits for it. Only
-- chained runs are in it. Built CONCURRENTLY so an upgrade never blocks
-- writers. Without GIN's fast update: the entries of freshly inserted
-- chained runs would sit in an unsorted pending list that every lookup
-- reads whole (10,000 finishes against 10,000 fresh dependents took
-- 200 s); set here, at creation, because changing it later (ALTER INDEX
-- ... SET) takes an ACCESS EXCLUSIVE lock that stops every statement on
-- wfq.runs.
CREATE INDEX CONCURRENTLY IF NOT EXISTS runs_depends_on_idx
    ON wfq.runs USING gin (depends_on) WITH (fastupdate = off)
    WHERE depends_on IS NOT NULL;
