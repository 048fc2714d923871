-- no-transaction
-- Succeeded runs whose outputs the mirror service has not looked at yet
-- (media_state NULL). Built CONCURRENTLY so an upgrade never blocks writers.
CREATE INDEX CONCURRENTLY IF NOT EXISTS runs_media_unplanned_idx
    ON wfq.runs (finished_at)
    WHERE state = 'succeeded' AND media_state IS NULL;
