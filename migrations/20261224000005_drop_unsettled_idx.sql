-- no-transaction
-- Replaced by runs_unsettled_sent_idx (20261224000004).
DROP INDEX CONCURRENTLY IF EXISTS wfq.runs_unsettled_idx;
