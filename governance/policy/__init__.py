"""The policy layer: config models, authorization, tiers, retry and limits. Pure: no I/O.

Everything here is decided from a config, a context and an action; Redis and Celery live in the
layers above (store, integration), which call in here for every decision.
"""

from governance.policy.actions import (
    LLM_CALL_CLASS,
    Action,
    LLMCall,
    Message,
    ToolCall,
    estimate_input_tokens,
    parse_action,
)
from governance.policy.config import Budget, GovernanceConfig, ModelPrice, RateLimit, RateLimits
from governance.policy.context import ActionContext
from governance.policy.decision import Decision
from governance.policy.duration import parse_duration
from governance.policy.engine import Policy
from governance.policy.errors import (
    ActionError,
    ErrorKind,
    classify_http_status,
    parse_retry_after,
)
from governance.policy.grants import Grant
from governance.policy.hooks import Hook, HookDecision, load_hook, run_hooks
from governance.policy.limits import (
    Allowed,
    Blocked,
    LimitResult,
    LimitWarning,
    NearLimit,
    Violation,
    ViolationType,
    check_limit,
)
from governance.policy.loader import ConfigError
from governance.policy.long_running import PRESETS, LongRunningLimits
from governance.policy.retry import RetryPolicy
from governance.policy.tenant import ApprovalPolicy, TenantPolicy
from governance.policy.tiers import Outcome, Tier, TierLevel
from governance.policy.usage import Usage

__all__ = [
    "LLM_CALL_CLASS",
    "PRESETS",
    "Action",
    "ActionContext",
    "ActionError",
    "Allowed",
    "ApprovalPolicy",
    "Blocked",
    "Budget",
    "ConfigError",
    "Decision",
    "ErrorKind",
    "GovernanceConfig",
    "Grant",
    "Hook",
    "HookDecision",
    "LLMCall",
    "LimitResult",
    "LimitWarning",
    "LongRunningLimits",
    "Message",
    "ModelPrice",
    "NearLimit",
    "Outcome",
    "Policy",
    "RateLimit",
    "RateLimits",
    "RetryPolicy",
    "TenantPolicy",
    "Tier",
    "TierLevel",
    "ToolCall",
    "Usage",
    "Violation",
    "ViolationType",
    "check_limit",
    "classify_http_status",
    "estimate_input_tokens",
    "load_hook",
    "parse_action",
    "parse_duration",
    "parse_retry_after",
    "run_hooks",
]
