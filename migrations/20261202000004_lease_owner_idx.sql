-- no-transaction
-- The runs a worker holds: renewed while their steps run, given back at
-- shutdown, rescued when the worker dies.
CREATE INDEX CONCURRENTLY IF NOT EXISTS runs_lease_owner_idx
    ON wfq.runs (lease_owner)
    WHERE lease_owner IS NOT NULL;
