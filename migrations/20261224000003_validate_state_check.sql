-- no-transaction
-- The CHECKs 20261224000001 added NOT VALID, validated now: VALIDATE
-- CONSTRAINT scans the table under SHARE UPDATE EXCLUSIVE, which blocks
-- no producer and no worker (the ALTER that added them held its lock for
-- microseconds). sqlx sends the file as one simple query, which
-- PostgreSQL runs as one implicit transaction: the three validations
-- commit together, and a lock_timeout on any of them rolls all three back
-- (`wfq migrate` tries again).
SET lock_timeout = '500ms';
ALTER TABLE wfq.runs VALIDATE CONSTRAINT runs_state_known;
ALTER TABLE wfq.runs VALIDATE CONSTRAINT runs_on_dependency_failure_known;
ALTER TABLE wfq.runs VALIDATE CONSTRAINT runs_depends_on_size;
RESET lock_timeout;
