-- no-transaction
-- The cost estimate of a run whose money is unknown (the highest cost of a
-- settled run of its workflow in the last 30 days) is looked up as that
-- run's final write is applied, inside the writer's batch: this index makes
-- it one short range per workflow instead of a walk over 30 days of the
-- provider's runs. Built without blocking producers or workers.
CREATE INDEX CONCURRENTLY IF NOT EXISTS runs_cost_estimate_idx
    ON wfq.runs (provider, workflow_id, submitted_at)
    INCLUDE (final_amount)
    WHERE settled_at IS NOT NULL AND final_amount > 0;
