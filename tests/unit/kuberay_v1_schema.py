"""A JSON schema for the ray.io/v1 fields the manifests in clusters/ use, written from KubeRay's CRD API
reference (KubeRay v1.6/v1.7: RayCluster, RayJob, RayService; docs.ray.io .../kuberay/references/api.html).

Ray's own objects are closed (`additionalProperties: false`: a misspelt field is an error, as the API server's
structural schema prunes it silently); the embedded Kubernetes PodSpec is checked only where the manifests
rely on it (containers, resources, env, volumes, tolerations). `rayStartParams` is map[string]string, so
`num-cpus: 0` (an int) is refused, as the CRD does.
"""

from __future__ import annotations

STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
QUANTITY = {"type": ["string", "integer"]}
NON_NEGATIVE = {"type": "integer", "minimum": 0}

RESOURCES = {"type": "object", "additionalProperties": False, "properties": {
    "requests": {"type": "object", "additionalProperties": QUANTITY},
    "limits": {"type": "object", "additionalProperties": QUANTITY}}}

ENV_VAR = {"type": "object", "required": ["name"], "additionalProperties": False, "properties": {
    "name": {"type": "string"}, "value": {"type": "string"},
    "valueFrom": {"type": "object", "properties": {
        "secretKeyRef": {"type": "object", "required": ["name", "key"], "properties": {
            "name": {"type": "string"}, "key": {"type": "string"}, "optional": {"type": "boolean"}}}}}}}

CONTAINER = {"type": "object", "required": ["name", "image"], "properties": {
    "name": {"type": "string"}, "image": {"type": "string"}, "resources": RESOURCES,
    "env": {"type": "array", "items": ENV_VAR},
    "ports": {"type": "array", "items": {"type": "object", "required": ["containerPort"], "properties": {
        "containerPort": {"type": "integer"}, "name": {"type": "string"}}}},
    "volumeMounts": {"type": "array", "items": {"type": "object", "required": ["name", "mountPath"], "properties": {
        "name": {"type": "string"}, "mountPath": {"type": "string"}, "readOnly": {"type": "boolean"}}}}}}

TOLERATION = {"type": "object", "additionalProperties": False, "properties": {
    "key": {"type": "string"}, "operator": {"enum": ["Exists", "Equal"]}, "value": {"type": "string"},
    "effect": {"enum": ["NoSchedule", "PreferNoSchedule", "NoExecute"]}, "tolerationSeconds": {"type": "integer"}}}

POD_TEMPLATE = {"type": "object", "required": ["spec"], "properties": {
    "metadata": {"type": "object"},
    "spec": {"type": "object", "required": ["containers"], "properties": {
        "containers": {"type": "array", "minItems": 1, "items": CONTAINER},
        "volumes": {"type": "array", "items": {"type": "object", "required": ["name"]}},
        "tolerations": {"type": "array", "items": TOLERATION},
        "nodeSelector": STRING_MAP}}}}

HEAD_GROUP = {"type": "object", "required": ["rayStartParams", "template"], "additionalProperties": False,
              "properties": {"rayStartParams": STRING_MAP, "template": POD_TEMPLATE,
                             "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                             "headService": {"type": "object"}, "enableIngress": {"type": "boolean"},
                             "suspend": {"type": "boolean"}}}

WORKER_GROUP = {"type": "object", "required": ["groupName", "rayStartParams", "template"],
                "additionalProperties": False, "properties": {"groupName": {"type": "string", "minLength": 1}, "replicas": NON_NEGATIVE,
                               "minReplicas": NON_NEGATIVE, "maxReplicas": NON_NEGATIVE,
                               "idleTimeoutSeconds": NON_NEGATIVE, "numOfHosts": {"type": "integer", "minimum": 1},
                               "rayStartParams": STRING_MAP, "template": POD_TEMPLATE, "suspend": {"type": "boolean"},
                               "scaleStrategy": {"type": "object"}}}

AUTOSCALER = {"type": "object", "additionalProperties": False, "properties": {
    "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]}, "idleTimeoutSeconds": NON_NEGATIVE,
    "resources": RESOURCES, "image": {"type": "string"}, "imagePullPolicy": {"type": "string"},
    "env": {"type": "array", "items": ENV_VAR}, "envFrom": {"type": "array"}, "volumeMounts": {"type": "array"},
    "securityContext": {"type": "object"}, "version": {"enum": ["v1", "v2"]}}}

RAY_CLUSTER_SPEC = {"type": "object", "required": ["headGroupSpec"], "additionalProperties": False, "properties": {
    "rayVersion": {"type": "string"}, "enableInTreeAutoscaling": {"type": "boolean"},
    "autoscalerOptions": AUTOSCALER,
    "authOptions": {"type": "object", "additionalProperties": False, "properties": {
        "mode": {"enum": ["disabled", "token"]}, "secretName": {"type": "string"},
        "enableK8sTokenAuth": {"type": "boolean"}}},
    "headGroupSpec": HEAD_GROUP, "workerGroupSpecs": {"type": "array", "items": WORKER_GROUP},
    "headServiceAnnotations": STRING_MAP, "suspend": {"type": "boolean"}, "managedBy": {"type": "string"},
    "gcsFaultToleranceOptions": {"type": "object"}}}

RAY_JOB_SPEC = {"type": "object", "additionalProperties": False, "properties": {
    "entrypoint": {"type": "string"}, "runtimeEnvYAML": {"type": "string"}, "rayClusterSpec": RAY_CLUSTER_SPEC,
    "clusterSelector": STRING_MAP,
    "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
    "backoffLimit": NON_NEGATIVE, "shutdownAfterJobFinishes": {"type": "boolean"},
    "ttlSecondsAfterFinished": NON_NEGATIVE, "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
    "entrypointNumCpus": {"type": "number"}, "entrypointNumGpus": {"type": "number"},
    "entrypointResources": {"type": "string"}, "jobId": {"type": "string"}, "metadata": STRING_MAP,
    "suspend": {"type": "boolean"}, "submitterPodTemplate": POD_TEMPLATE, "submitterConfig": {"type": "object"},
    "deletionStrategy": {"type": "object"}, "managedBy": {"type": "string"}}}

RAY_SERVICE_SPEC = {"type": "object", "required": ["rayClusterConfig"], "additionalProperties": False, "properties": {
    "serveConfigV2": {"type": "string"}, "rayClusterConfig": RAY_CLUSTER_SPEC, "serveService": {"type": "object"},
    "upgradeStrategy": {"type": "object", "properties": {
        "type": {"enum": ["NewCluster", "NewClusterWithIncrementalUpgrade", "None"]}}},
    "excludeHeadPodFromServeSvc": {"type": "boolean"}, "deploymentUnhealthySecondThreshold": NON_NEGATIVE,
    "serviceUnhealthySecondThreshold": NON_NEGATIVE, "rayClusterDeletionDelaySeconds": NON_NEGATIVE}}

SPECS = {"RayCluster": RAY_CLUSTER_SPEC, "RayJob": RAY_JOB_SPEC, "RayService": RAY_SERVICE_SPEC}


def schema_of(kind: str) -> dict:
    """The schema of one ray.io/v1 object of `kind`."""
    return {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "properties": {
        "apiVersion": {"const": "ray.io/v1"}, "kind": {"const": kind},
        "metadata": {"type": "object", "required": ["name"], "properties": {
            "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63}}},
        "spec": SPECS[kind]}}
