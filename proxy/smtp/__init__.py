"""The SMTP side: a local submission server (aiosmtpd) relaying to the upstream with XOAUTH2.

- :mod:`.server`: the listener and what its sessions share (deadlines, connection limit);
- :mod:`.session`: one client connection, relaying MAIL/RCPT/DATA to the user's upstream session;
- :mod:`.auth`: AUTH PLAIN / AUTH LOGIN on top of the shared login sequence;
- :mod:`.upstream`: the client of the upstream server (STARTTLS, two-step AUTH XOAUTH2);
- :mod:`.capabilities`: the upstream's EHLO keywords, known before any login;
- :mod:`.wire`: pure helpers (replies, EHLO, dot-stuffing, reply texts).
"""
