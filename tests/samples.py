"""One sample of every wire message, the source of the golden vectors."""

from __future__ import annotations

from stigmer.broker.protocol import (
    ApplyEnvironments,
    DeleteEnvironment,
    Environment,
    EnvironmentList,
    EnvironmentSpec,
    EnvironmentSummary,
    Error,
    GetEnvironment,
    GetStatus,
    Hello,
    KeyRotated,
    ListEnvironments,
    Ok,
    PutEnvironment,
    Request,
    Response,
    RotateKey,
    Shutdown,
    Status,
    UnsetVariables,
    Variable,
    VariableView,
    Welcome,
)

SAMPLES: dict[str, Request | Response] = {
    "Hello": Hello(id=1, version=1, client="golden"),
    "GetStatus": GetStatus(id=2),
    "Shutdown": Shutdown(id=3),
    "PutEnvironment": PutEnvironment(id=4, name="dev", data={
        "API_KEY": Variable(value="s3cr3t", is_secret=True),
        "LOG_LEVEL": Variable(value="debug")}),
    "GetEnvironment": GetEnvironment(id=5, name="dev", reveal=True),
    "ListEnvironments": ListEnvironments(id=6),
    "UnsetVariables": UnsetVariables(id=7, name="dev", keys=["LOG_LEVEL"]),
    "DeleteEnvironment": DeleteEnvironment(id=8, name="dev"),
    "ApplyEnvironments": ApplyEnvironments(id=9, environments=[EnvironmentSpec(
        name="prod", data={"REGION": Variable(value="eu-west-1")})]),
    "RotateKey": RotateKey(id=10),
    "Welcome": Welcome(id=1, version=1, server_version="0.1.0"),
    "Status": Status(id=2, version="0.1.0", pid=4242, uptime_s=1.5, socket="/run/b.sock",
                     socket_mode="0600", store="/h/local.db", key_source="file (/h/master.key)",
                     started_by="manual", environments=1, contexts=0, tokens=0, requests=3,
                     connections=1),
    "Ok": Ok(id=3),
    "Environment": Environment(id=5, name="dev", data={
        "API_KEY": VariableView(is_secret=True),
        "LOG_LEVEL": VariableView(is_secret=False, value="debug")},
        created_at=1700000000.0, updated_at=1700000001.5),
    "EnvironmentList": EnvironmentList(id=6, environments=[EnvironmentSummary(
        name="dev", variables=2, secrets=1, updated_at=1700000001.5)]),
    "KeyRotated": KeyRotated(id=10, key_id="0123456789abcdef", rewrapped=1,
                             key_source="file (/h/master.key)"),
    "Error": Error(id=11, code="unsupported_version", message="speak version 1",
                   supported_versions=[1]),
}
