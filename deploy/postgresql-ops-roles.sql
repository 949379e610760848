-- Roles for the people who queue edits in SQL and for those who approve them, on a PostgreSQL mirror.
-- Run as the database owner (the role syncd connects as), in the mirror's database:
--   psql -d syncd -f deploy/postgresql-ops-roles.sql
--   (-v ops=NAME -v approvers=NAME to name the two roles otherwise; defaults syncd_ops, syncd_approvers)
-- then make each person, logging in as their own role, a member of one or both:
--   CREATE ROLE alice LOGIN PASSWORD '...' IN ROLE syncd_ops;
--   CREATE ROLE bob LOGIN PASSWORD '...' IN ROLE syncd_approvers;
-- device_edits.requested_by and approved_by record the login role (session_user).
\if :{?ops}
\else
\set ops syncd_ops
\endif
\if :{?approvers}
\else
\set approvers syncd_approvers
\endif

-- ops: read everything; queue an edit with a plain INSERT naming these columns only. requested_by
-- (session_user), requested_via ('sql'), requested_at, status ('pending') and the bookkeeping take their
-- defaults, so the role can neither name someone else as the requester nor approve, mark or delete
-- anything: history (device_changes, sync_runs, device_edits rows) stays as syncd wrote it.
CREATE ROLE :"ops" NOLOGIN;
GRANT CONNECT ON DATABASE :"DBNAME" TO :"ops";
GRANT USAGE ON SCHEMA public TO :"ops";
GRANT SELECT ON ALL TABLES IN SCHEMA public TO :"ops";
GRANT INSERT (device_id, org_id, action, payload, base, base_updated_at) ON device_edits TO :"ops";
GRANT USAGE ON SEQUENCE device_edits_id_seq TO :"ops";

-- approvers: read everything; approve an edit in SQL by setting approved_at, nothing else:
--   UPDATE device_edits SET approved_at = now() WHERE id = 42;
-- The trigger syncd_edit_approval records approved_by = session_user and approved_at on the database's
-- clock, and refuses the approval when the approver is the person who requested the edit. The next
-- round of the reconciler makes the edit pending and pushes it.
CREATE ROLE :"approvers" NOLOGIN;
GRANT CONNECT ON DATABASE :"DBNAME" TO :"approvers";
GRANT USAGE ON SCHEMA public TO :"approvers";
GRANT SELECT ON ALL TABLES IN SCHEMA public TO :"approvers";
GRANT UPDATE (approved_at) ON device_edits TO :"approvers";

-- Tables and views added by later syncd migrations (created by this same owner) are readable too.
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO :"ops", :"approvers";
