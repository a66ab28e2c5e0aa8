"""IMAP/SMTP proxy that turns plain password logins into XOAUTH2 logins upstream."""

__version__ = "0.1.0"
