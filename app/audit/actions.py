"""The audit trail's vocabulary: the audited actions and their DICOM PS3.15 event codes.

Every event's ``action`` is an ``AuditAction``; ``append_in_transaction`` (``app.audit.chain``) stores the codes of
``DICOM_EVENT_CODES`` beside it, so they are part of the hashed event and cannot change for an action once used.

DICOM PS3.15 mapping (A.5.1: EventID, EventTypeCode, EventActionCode; codes of scheme "DCM", PS3.16 CID 400-403)

    ========================  ===================================  =========================================  ===
    action                    EventID                              EventTypeCode                              act
    ========================  ===================================  =========================================  ===
    login_ok, login_failed    110114 User Authentication           110122 Login                               E
    logout                    110114 User Authentication           110123 Logout                              E
    lockout                   110113 Security Alert                110137 User Security Attributes Changed    E
    user_add, token_create    110113 Security Alert                110137 User Security Attributes Changed    C
    user_disable/_enable      110113 Security Alert                110137 User Security Attributes Changed    U
    password_reset            110113 Security Alert                110137 User Security Attributes Changed    U
    token_revoke              110113 Security Alert                110137 User Security Attributes Changed    D
    upload                    110107 Import                        --                                         C
    generate                  110103 DICOM Instances Accessed      --                                         C
    view                      110103 DICOM Instances Accessed      --                                         R
    run_delete                110103 DICOM Instances Accessed      --                                         D
    export                    110106 Export                        --                                         R
    cancel, run_done/_failed  --                                   --                                         --
    job_interrupted           110100 Application Activity          --                                         E
    app_start                 110100 Application Activity          110120 Application Start                   E
    app_stop                  110100 Application Activity          110121 Application Stop                    E
    audit_view, audit_export  110101 Audit Log Used                --                                         R
    audit_verify              110101 Audit Log Used                --                                         E
    audit_triggers_restored   110113 Security Alert                110129 Security Configuration              E
    audit_chain_keyed         110113 Security Alert                110129 Security Configuration              E
    audit_key_rotated         110113 Security Alert                110129 Security Configuration              U
    audit_tamper_detected     110113 Security Alert                110129 Security Configuration              E
    audit_tamper_acknowledged 110113 Security Alert                110129 Security Configuration              E
    audit_anchor              110101 Audit Log Used                --                                         E
    pacs_query                110112 Query                         --                                         E
    pacs_retrieve             110107 Import                        --                                         C
    pacs_store                110106 Export                        --                                         R
    pacs_test                 110100 Application Activity          --                                         E
    ========================  ===================================  =========================================  ===

    110110 Patient Record is not used: the tool keeps no patient record. Outcome maps to EventOutcomeIndicator
    (``Outcome.dicom_code``).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal


class AuditAction(StrEnum):
    """Audited actions. Add new ones here *and* in ``DICOM_EVENT_CODES`` (a test checks both)."""

    LOGIN_OK = "login_ok"
    LOGIN_FAILED = "login_failed"
    LOGOUT = "logout"
    LOCKOUT = "lockout"
    USER_ADD = "user_add"
    USER_DISABLE = "user_disable"
    USER_ENABLE = "user_enable"
    PASSWORD_RESET = "password_reset"
    TOKEN_CREATE = "token_create"
    TOKEN_REVOKE = "token_revoke"
    UPLOAD = "upload"
    GENERATE = "generate"
    CANCEL = "cancel"
    RUN_DONE = "run_done"
    RUN_FAILED = "run_failed"
    JOB_INTERRUPTED = "job_interrupted"
    RUN_DELETE = "run_delete"
    VIEW = "view"
    EXPORT = "export"
    APP_START = "app_start"
    APP_STOP = "app_stop"
    AUDIT_VIEW = "audit_view"
    AUDIT_EXPORT = "audit_export"
    AUDIT_VERIFY = "audit_verify"
    AUDIT_TRIGGERS_RESTORED = "audit_triggers_restored"
    AUDIT_CHAIN_KEYED = "audit_chain_keyed"
    AUDIT_KEY_ROTATED = "audit_key_rotated"
    AUDIT_TAMPER_DETECTED = "audit_tamper_detected"
    AUDIT_TAMPER_ACKNOWLEDGED = "audit_tamper_acknowledged"
    AUDIT_ANCHOR = "audit_anchor"
    PACS_QUERY = "pacs_query"
    PACS_RETRIEVE = "pacs_retrieve"
    PACS_STORE = "pacs_store"
    PACS_TEST = "pacs_test"


@dataclass(frozen=True)
class DicomEventCodes:
    """DICOM PS3.15 A.5.1 coded values of one action (codes of scheme "DCM", PS3.16 CID 400/401)."""

    event_id: str | None
    event_id_meaning: str | None
    event_type: str | None
    event_type_meaning: str | None
    event_action: Literal["C", "R", "U", "D", "E"] | None


_AUTH = ("110114", "User Authentication")
_SECURITY = ("110113", "Security Alert")
_USER_ATTRS = ("110137", "User Security Attributes Changed")
_APP = ("110100", "Application Activity")
_AUDIT_LOG = ("110101", "Audit Log Used")
_ACCESSED = ("110103", "DICOM Instances Accessed")
_NONE = (None, None)

DICOM_EVENT_CODES: dict[AuditAction, DicomEventCodes] = {
    AuditAction.LOGIN_OK: DicomEventCodes(*_AUTH, "110122", "Login", "E"),
    AuditAction.LOGIN_FAILED: DicomEventCodes(*_AUTH, "110122", "Login", "E"),
    AuditAction.LOGOUT: DicomEventCodes(*_AUTH, "110123", "Logout", "E"),
    AuditAction.LOCKOUT: DicomEventCodes(*_SECURITY, *_USER_ATTRS, "E"),
    AuditAction.USER_ADD: DicomEventCodes(*_SECURITY, *_USER_ATTRS, "C"),
    AuditAction.USER_DISABLE: DicomEventCodes(*_SECURITY, *_USER_ATTRS, "U"),
    AuditAction.USER_ENABLE: DicomEventCodes(*_SECURITY, *_USER_ATTRS, "U"),
    AuditAction.PASSWORD_RESET: DicomEventCodes(*_SECURITY, *_USER_ATTRS, "U"),
    AuditAction.TOKEN_CREATE: DicomEventCodes(*_SECURITY, *_USER_ATTRS, "C"),
    AuditAction.TOKEN_REVOKE: DicomEventCodes(*_SECURITY, *_USER_ATTRS, "D"),
    AuditAction.UPLOAD: DicomEventCodes("110107", "Import", *_NONE, "C"),
    AuditAction.GENERATE: DicomEventCodes(*_ACCESSED, *_NONE, "C"),
    AuditAction.VIEW: DicomEventCodes(*_ACCESSED, *_NONE, "R"),
    AuditAction.EXPORT: DicomEventCodes("110106", "Export", *_NONE, "R"),
    AuditAction.CANCEL: DicomEventCodes(*_NONE, *_NONE, None),
    AuditAction.RUN_DONE: DicomEventCodes(*_NONE, *_NONE, None),
    AuditAction.RUN_FAILED: DicomEventCodes(*_NONE, *_NONE, None),
    AuditAction.JOB_INTERRUPTED: DicomEventCodes(*_APP, *_NONE, "E"),
    AuditAction.RUN_DELETE: DicomEventCodes(*_ACCESSED, *_NONE, "D"),
    AuditAction.APP_START: DicomEventCodes(*_APP, "110120", "Application Start", "E"),
    AuditAction.APP_STOP: DicomEventCodes(*_APP, "110121", "Application Stop", "E"),
    AuditAction.AUDIT_VIEW: DicomEventCodes(*_AUDIT_LOG, *_NONE, "R"),
    AuditAction.AUDIT_EXPORT: DicomEventCodes(*_AUDIT_LOG, *_NONE, "R"),
    AuditAction.AUDIT_VERIFY: DicomEventCodes(*_AUDIT_LOG, *_NONE, "E"),
    AuditAction.AUDIT_TRIGGERS_RESTORED: DicomEventCodes(*_SECURITY, "110129", "Security Configuration", "E"),
    AuditAction.AUDIT_CHAIN_KEYED: DicomEventCodes(*_SECURITY, "110129", "Security Configuration", "E"),
    AuditAction.AUDIT_KEY_ROTATED: DicomEventCodes(*_SECURITY, "110129", "Security Configuration", "U"),
    AuditAction.AUDIT_TAMPER_DETECTED: DicomEventCodes(*_SECURITY, "110129", "Security Configuration", "E"),
    AuditAction.AUDIT_TAMPER_ACKNOWLEDGED: DicomEventCodes(*_SECURITY, "110129", "Security Configuration", "E"),
    AuditAction.AUDIT_ANCHOR: DicomEventCodes(*_AUDIT_LOG, *_NONE, "E"),
    AuditAction.PACS_QUERY: DicomEventCodes("110112", "Query", *_NONE, "E"),
    AuditAction.PACS_RETRIEVE: DicomEventCodes("110107", "Import", *_NONE, "C"),
    AuditAction.PACS_STORE: DicomEventCodes("110106", "Export", *_NONE, "R"),
    AuditAction.PACS_TEST: DicomEventCodes(*_APP, *_NONE, "E"),
}

