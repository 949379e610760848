-- A read-only role for report writers on a PostgreSQL mirror.
-- Run as the database owner (the role syncd connects as), in the mirror's database:
--   psql -d syncd -v reader=alice -v password="'change-me'" -f deploy/postgresql-report-role.sql
-- Members of syncd_reports can read the tables and report views; they cannot change anything.

CREATE ROLE syncd_reports NOLOGIN;
GRANT CONNECT ON DATABASE :"DBNAME" TO syncd_reports;
GRANT USAGE ON SCHEMA public TO syncd_reports;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO syncd_reports;
-- Tables and views added by later syncd migrations (created by this same owner) are readable too.
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO syncd_reports;

CREATE ROLE :"reader" LOGIN PASSWORD :password IN ROLE syncd_reports;
