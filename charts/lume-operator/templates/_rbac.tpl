{{/* Rule lists of the operator's RBAC (used in rbac.yaml, which says why). */}}

{{- define "lume-operator.rules.watched" }}
# The three kinds: watched, and patched (finalizers, kopf's progress annotations).
- apiGroups: ["lume.dev"]
  resources: ["schedulingbackends", "lumeflows", "flowofflows"]
  verbs: ["get", "list", "watch", "patch", "update"]
- apiGroups: ["lume.dev"]
  resources: ["schedulingbackends/status", "lumeflows/status", "flowofflows/status"]
  verbs: ["get", "patch", "update"]
# Events: posted by kopf and the operator.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
# The agent of a SchedulingBackend: its ServiceAccount, Deployment, Role and RoleBinding.
- apiGroups: [""]
  resources: ["serviceaccounts"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Held for the workers' Roles (see the top of this template), never used by the operator itself.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "delete"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
- apiGroups: [""]
  resources: ["pods/log"]
  verbs: ["get"]
{{- end }}

{{- define "lume-operator.rules.secrets" }}
# Prefect API keys, read only by the name a SchedulingBackend gives (never listed or watched).
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
{{- end }}

{{- define "lume-operator.rules.crds" }}
# kopf scans CRDs to learn when the resources it serves appear or change.
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- end }}
