-- no-transaction
-- Claims walk one lane per (provider profile, state): a paused profile, a
-- profile whose queued runs wait for money, or one this worker does not
-- serve adds nothing to the cost of a claim (with the provider only in the
-- filter, a paused profile's 100,000 due runs were read by every claim of
-- every worker). Built CONCURRENTLY so an upgrade never blocks writers;
-- `wfq migrate` drops an invalid index left by an interrupted build first.
CREATE INDEX CONCURRENTLY IF NOT EXISTS runs_claim_lane_idx
    ON wfq.runs (provider, state, priority DESC, due_at, id)
    WHERE state IN ('queued', 'submitting', 'running');
