-- no-transaction
-- Runs held back by a limit of their profile (money, runs at once): woken
-- when the limit frees up, a few at a time, without walking the queue.
CREATE INDEX CONCURRENTLY IF NOT EXISTS runs_held_idx
    ON wfq.runs (provider, due_at)
    WHERE state = 'queued' AND hold_reason IS NOT NULL;
