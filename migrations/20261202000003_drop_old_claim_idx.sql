-- no-transaction
-- Replaced by runs_claim_lane_idx; every index on a column that changes at
-- every step (due_at) costs an entry per transition.
DROP INDEX CONCURRENTLY IF EXISTS wfq.runs_claim_idx;
