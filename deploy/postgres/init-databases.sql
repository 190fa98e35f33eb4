-- One database per service (no service reads another's data: ADR 0001). Run once, by the
-- postgres image's /docker-entrypoint-initdb.d on an empty data directory.
CREATE DATABASE requester;
CREATE DATABASE verifier;
CREATE DATABASE publisher;
CREATE DATABASE compute_1;
CREATE DATABASE compute_2;
CREATE DATABASE compute_3;
