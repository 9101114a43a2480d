"""docker-compose.yml, checked offline (no Docker engine): valid Compose, and tied to the code.

- the file validates against the Compose specification's JSON schema (check-jsonschema's vendored copy);
- every ``sparkle`` command in it is a command of the CLI and its arguments parse; flower's options parse;
- every queue has a consumer in both profiles, and only queues of ``shared/sparkle/queues.py`` are named;
- every ``SPARKLE_*`` variable is one the code reads (settings classes, ``options_from_env``, the backends);
- service URLs, ports, dependencies, GPU reservations, model volumes and profiles are consistent;
- commands, worker sizing and model-server settings equal the Kubernetes manifests' (``sparkle.k8s_render``);
- the Dockerfiles the builds name exist, and ``.dockerignore`` keeps what they copy.
"""

from __future__ import annotations

import ast
import fnmatch
import importlib
import re
import shlex
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from pydantic import BaseModel

from sparkle import k8s_render
from sparkle.backends import SERVICES, options_from_env
from sparkle.config import PipelineConfig
from sparkle.queues import ALL_QUEUES, CPU_QUEUE, SERVICE_QUEUES
from sparkle.settings import DistributedSettings
from sparkle.serving import ServeSettings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
PROFILES = ("cpu", "gpu")
INFRA = ("redis", "minio", "minio-init")
ALWAYS_ON = (*INFRA, "gateway", "orchestrator", "flower")
MODELS_MOUNT = "/models"
BACKENDS = ("cpu", "tiny", "real")


# --- helpers --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compose() -> dict:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict) and isinstance(doc.get("services"), dict), "docker-compose.yml has no services"
    return doc


@pytest.fixture(scope="module")
def services(compose) -> dict[str, dict]:
    return compose["services"]


_VAR = re.compile(r"\$(?:\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
                  r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")


def resolve(value, env: dict | None = None):
    """Compose interpolation of a string with the host environment ``env`` (default: empty, so the file's
    defaults); ``$$`` is a literal ``$``. Non-strings are returned as they are."""
    if not isinstance(value, str):
        return value
    env = env or {}

    def one(m: re.Match) -> str:
        name = m["name"] or m["bare"]
        given = env.get(name)
        op, arg = m["op"], m["arg"] or ""
        if op in (":-", "-"):
            return given if (given if op == ":-" else given is not None) else arg
        if op in (":?", "?"):
            if not given:
                raise ValueError(f"${{{name}}} is required: {arg}")
            return given
        if op in (":+", "+"):
            return arg if given else ""
        return given or ""

    return "$".join(_VAR.sub(one, part) for part in value.split("$$"))


def variables(value) -> list[re.Match]:
    """Every interpolation (``${NAME...}`` or ``$NAME``) in the strings under ``value``."""
    if isinstance(value, dict):
        return [m for k, v in value.items() for m in variables(k) + variables(v)]
    if isinstance(value, list):
        return [m for v in value for m in variables(v)]
    if isinstance(value, str):
        return [m for part in value.split("$$") for m in _VAR.finditer(part)]
    return []


def profiles(svc: dict) -> set[str]:
    return set(svc.get("profiles") or [])


def active(services: dict, profile: str) -> dict[str, dict]:
    """Services that `docker compose --profile PROFILE up` starts."""
    return {n: s for n, s in services.items() if not profiles(s) or profile in profiles(s)}


def command(svc: dict) -> list[str]:
    """Entrypoint override + command, as argv (strings are split the way Compose splits them). A shell
    wrapper ``sh -c "VAR=... exec PROGRAM ARGS"`` (flower reading its password file) is the program it execs."""
    out = []
    for key in ("entrypoint", "command"):
        value = svc.get(key)
        out += shlex.split(value) if isinstance(value, str) else list(value or [])
    if out[:2] == ["sh", "-c"] and len(out) == 3 and "exec" in shlex.split(out[2].replace("$$", "$")):
        words = shlex.split(out[2].replace("$$", "$"))
        out = words[words.index("exec") + 1:]
    return [str(resolve(a)) for a in out]


def sparkle_argv(svc: dict) -> list[str] | None:
    argv = command(svc)
    return argv[1:] if argv and argv[0] == "sparkle" else None


def option(argv: list[str], name: str) -> str | None:
    """The value of ``--name VALUE`` or ``--name=VALUE`` (the last one given)."""
    found = None
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            found = argv[i + 1]
        elif arg.startswith(name + "="):
            found = arg.split("=", 1)[1]
    return found


def environment(svc: dict) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return {k: (None if v is None else str(v)) for k, v in env.items()}


def resolved_env(svc: dict) -> dict[str, str]:
    return {k: resolve(v) for k, v in environment(svc).items() if v is not None}


def workers(services: dict) -> dict[str, list[str]]:
    """Service name -> argv after ``sparkle worker``."""
    out = {}
    for name, svc in services.items():
        argv = sparkle_argv(svc)
        if argv and argv[0] == "worker":
            out[name] = argv[1:]
    return out


def queues_of(argv: list[str]) -> list[str]:
    value = option(argv, "--queues") or option(argv, "-Q")
    assert value, f"a worker without --queues: {argv}"
    return [q.strip() for q in value.split(",") if q.strip()]


def servers(services: dict) -> dict[str, tuple[str, list[str]]]:
    """Compose service name -> (model service, argv after ``sparkle serve``)."""
    out = {}
    for name, svc in services.items():
        argv = sparkle_argv(svc)
        if argv and argv[0] == "serve":
            out[name] = (argv[1], argv[2:])
    return out


def listening_port(svc: dict) -> int | None:
    """The port the service's process listens on: its command's ``--port`` (``--port N`` or ``--port=N``)."""
    value = option(command(svc), "--port")
    return int(value) if value else None


def healthcheck_url(svc: dict) -> str | None:
    test = (svc.get("healthcheck") or {}).get("test")
    if not test:
        return None
    text = test if isinstance(test, str) else " ".join(map(str, test))
    m = re.search(r"https?://[^\s'\"]+", text)
    return m.group(0) if m else None


def depends_on(svc: dict) -> dict[str, str]:
    deps = svc.get("depends_on") or {}
    if isinstance(deps, list):
        return {d: "service_started" for d in deps}
    return {d: (spec or {}).get("condition", "service_started") for d, spec in deps.items()}


def seconds(duration: str | int) -> float:
    if isinstance(duration, (int, float)):
        return float(duration)
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(a + b for a, b in parts) == duration, f"bad duration {duration!r}"
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    return sum(float(a) * scale[b] for a, b in parts)


def gpu_devices(svc: dict) -> list[dict]:
    res = ((svc.get("deploy") or {}).get("resources") or {}).get("reservations") or {}
    return [d for d in res.get("devices") or [] if "gpu" in (d.get("capabilities") or [])]


def mounts(svc: dict) -> list[dict]:
    """Volumes in long form: {type, source, target, read_only}."""
    out = []
    for v in svc.get("volumes") or []:
        if isinstance(v, str):
            parts = v.split(":")
            out.append({"type": "bind" if parts[0].startswith((".", "/", "$", "~")) else "volume",
                        "source": parts[0], "target": parts[1],
                        "read_only": len(parts) > 2 and "ro" in parts[2].split(",")})
        else:
            out.append(v)
    return out


def k8s_doc(filename: str, kind: str, name: str) -> dict:
    for doc in yaml.safe_load_all((ROOT / "k8s" / "base" / filename).read_text()):
        if doc and doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"no {kind}/{name} in k8s/base/{filename}")


def k8s_container(filename: str, kind: str, name: str, container: str | None = None) -> dict:
    spec = k8s_doc(filename, kind, name)["spec"]["template"]["spec"]
    found = spec.get("initContainers", []) + spec["containers"]
    return found[0] if container is None else next(c for c in found if c["name"] == container)


def server_of(services: dict, model_service: str) -> str:
    """The compose service running ``sparkle serve MODEL_SERVICE`` (gpu profile)."""
    (name,) = [n for n, (s, _) in servers(services).items() if s == model_service]
    return name


def worker_of(services: dict, queue: str, profile: str) -> str:
    names = [n for n, argv in workers(active(services, profile)).items() if queue in queues_of(argv)]
    assert len(names) == 1, f"{profile}: queue {queue} is consumed by {names or 'nothing'}"
    return names[0]


# --- the file itself ------------------------------------------------------------------------------------------

def _check_jsonschema(path: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("check-jsonschema")
    assert exe.exists(), f"{exe} missing: install the dev extra (`make install`)"
    return subprocess.run([str(exe), "--builtin-schema", "vendor.compose-spec", str(path)],
                          capture_output=True, text=True, timeout=120)


def test_file_validates_against_the_compose_specification(compose):
    proc = _check_jsonschema(COMPOSE)
    assert proc.returncode == 0, f"docker-compose.yml is not valid Compose:\n{proc.stdout}\n{proc.stderr}"


def test_schema_check_rejects_a_broken_file(compose, tmp_path):
    """The schema check above is not vacuous: an unknown service key and a bad healthcheck are refused."""
    broken = yaml.safe_load(COMPOSE.read_text())
    broken["services"]["gateway"]["heathcheck"] = broken["services"]["gateway"].pop("healthcheck")
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(broken))
    assert _check_jsonschema(path).returncode != 0


def test_interpolated_variables_all_have_defaults(compose):
    """`docker compose up` works with an empty environment: every ${VAR} has a default (no unset warnings,
    no empty device ids or credentials), and ${SPARKLE_*} host variables are ones the code knows."""
    found = variables(compose)
    assert found, "no interpolation at all?"
    for m in found:
        name = m["name"] or m["bare"]
        assert m["op"] in (":-", "-"), f"${{{name}}} has no default: write ${{{name}:-...}}"
        if name.startswith("SPARKLE_"):
            assert name in allowed_sparkle_variables(), f"${{{name}}}: no SPARKLE_ setting of that name"


def test_profiles_are_cpu_and_gpu_only(services):
    used = set()
    for name, svc in services.items():
        assert profiles(svc) <= set(PROFILES), f"{name}: profiles {sorted(profiles(svc))} (only cpu, gpu)"
        used |= profiles(svc)
    assert used == set(PROFILES), f"profiles in use: {sorted(used)}"
    for name in ALWAYS_ON:
        assert name in services and not profiles(services[name]), f"{name} must run in every profile"


# --- commands -------------------------------------------------------------------------------------------------

def _cli():
    import typer.main

    from sparkle.orchestrator.cli import app

    return typer.main.get_command(app)


def test_every_sparkle_command_exists_and_its_arguments_parse(services):
    cli = _cli()
    seen = set()
    for name, svc in services.items():
        argv = sparkle_argv(svc)
        if argv is None:
            continue
        assert argv, f"{name}: `sparkle` without a subcommand"
        sub, args = argv[0], argv[1:]
        assert sub in cli.commands, (f"{name}: `sparkle {sub}` is not a command of sparkle.orchestrator.cli.app "
                                     f"(commands: {', '.join(sorted(cli.commands))})")
        try:
            cli.commands[sub].make_context(sub, list(args))
        except Exception as exc:  # click/typer usage errors: unknown option, missing or bad value
            pytest.fail(f"{name}: `sparkle {' '.join(argv)}` does not parse: {exc}")
        seen.add(sub)
    assert {"gateway", "worker", "serve"} <= seen


def test_flower_command_parses(services):
    from flower.command import is_flower_option
    from tornado.options import options

    import flower.options  # noqa: F401 - defines flower's tornado options

    argv = command(services["flower"])
    assert argv[:2] == ["celery", "--app"] and argv[3] == "flower", argv
    module = importlib.import_module(argv[2])
    assert hasattr(module, "app"), f"{argv[2]} has no Celery `app`"
    flower_args = argv[4:]
    # flower drops arguments that are not --name[=value] options before tornado parses them, so a value given
    # as a separate word (`--port 5555`) is lost and flower exits with "Option 'port' requires a value".
    kept = [a for a in flower_args if is_flower_option(a)]
    assert kept == flower_args, f"flower options must be --name=value: {flower_args}"
    options.parse_command_line(["flower", *kept], final=False)
    published = [str(p).rsplit(":", 1)[-1] for p in services["flower"].get("ports", [])]
    assert str(options.port) in published, f"flower listens on {options.port}, publishes {published}"


def test_queues_are_the_routing_queues_and_each_has_a_consumer_in_both_profiles(services):
    every = workers(services)
    assert every
    for name, argv in every.items():
        unknown = set(queues_of(argv)) - set(ALL_QUEUES)
        assert not unknown, f"{name}: queues {sorted(unknown)} are not in routing.ALL_QUEUES"
    for profile in PROFILES:
        consumed = {q for argv in workers(active(services, profile)).values() for q in queues_of(argv)}
        missing = set(ALL_QUEUES) - consumed
        assert not missing, f"--profile {profile}: nothing consumes {sorted(missing)}"
    orchestrators = [n for n, argv in every.items() if CPU_QUEUE in queues_of(argv)]
    assert orchestrators == ["orchestrator"] and not profiles(services["orchestrator"])


def test_service_workers_call_a_server_of_their_service_or_run_it_in_process(services):
    for name, argv in workers(services).items():
        svc_queues = [q for q in queues_of(argv) if q != CPU_QUEUE]
        url, backend = option(argv, "--service-url"), option(argv, "--backend")
        if not svc_queues:
            assert url is None and backend is None, f"{name}: the journey queue needs no service"
            continue
        assert (url is None) != (backend is None), f"{name}: give --service-url or --backend (one of them)"
        if backend is not None:
            assert backend in BACKENDS, f"{name}: --backend {backend}"
            if services[name].get("image") == "sparkle-factory-cpu":
                assert backend == "cpu", f"{name}: the CPU image has no torch: only --backend cpu runs in it"
            continue
        (queue,) = svc_queues  # one model server per worker
        model_service = next(s for s, q in SERVICE_QUEUES.items() if q == queue)
        parts = urlsplit(url)
        assert parts.scheme == "http" and parts.port, f"{name}: --service-url {url}"
        host = parts.hostname
        assert host in services, f"{name}: --service-url names {host!r}, not a compose service"
        target = services[host]
        assert profiles(target) == profiles(services[name]), f"{name} and {host} are not in the same profile"
        serve = sparkle_argv(target)
        assert serve and serve[:2] == ["serve", model_service], f"{name}: {host} does not serve {model_service}"
        assert listening_port(target) == parts.port, f"{name}: {host} listens on {listening_port(target)}"
        assert depends_on(services[name]).get(host) == "service_healthy", f"{name} must wait for {host}'s /readyz"


def test_model_servers_use_the_shared_store_and_answer_readyz(services):
    store_url = resolved_env(services["gateway"])["SPARKLE_STORE_URL"]
    found = servers(services)
    assert {s for s, _ in found.values()} == set(SERVICES), "one model server per model service"
    for name, (model_service, args) in found.items():
        assert model_service in SERVICES, f"{name}: unknown service {model_service}"
        assert option(args, "--store") == store_url, f"{name}: --store must be SPARKLE_STORE_URL ({store_url})"
        assert option(args, "--host") == "0.0.0.0", f"{name}: must listen on all interfaces"
        assert profiles(services[name]) == {"gpu"}
        port = listening_port(services[name])
        assert healthcheck_url(services[name]) in (f"http://127.0.0.1:{port}/readyz",
                                                   f"http://localhost:{port}/readyz"), name


def test_healthchecks_probe_the_port_the_process_listens_on(services):
    checked = 0
    for name, svc in services.items():
        url, port = healthcheck_url(svc), listening_port(svc)
        if url and port:
            assert urlsplit(url).port == port, f"{name}: healthcheck {url}, listens on {port}"
            checked += 1
    assert checked >= 8


def test_gateway_port_is_published_and_gets_the_manifest_root(services):
    gateway = services["gateway"]
    port = listening_port(gateway)
    assert port == 8080
    published = [str(p).rsplit(":", 1)[-1] for p in gateway.get("ports", [])]
    assert str(port) in published, f"gateway listens on {port}, publishes container ports {published}"
    for name in ("gateway", "orchestrator"):
        root = resolved_env(services[name]).get("SPARKLE_MANIFEST_ROOT")
        assert root, f"{name}: SPARKLE_MANIFEST_ROOT unset"
        assert any(m["target"] == root and m.get("read_only") for m in mounts(services[name])), (
            f"{name}: nothing mounted read-only at the manifest root {root}")


# --- dependencies ---------------------------------------------------------------------------------------------

def test_dependencies_exist_in_the_same_profile_and_their_conditions_can_be_met(services):
    for name, svc in services.items():
        for dep, condition in depends_on(svc).items():
            assert dep in services, f"{name} depends on {dep!r}, which is not a service"
            target = services[dep]
            assert not profiles(target) or (profiles(svc) and profiles(svc) <= profiles(target)), (
                f"{name} (profiles {sorted(profiles(svc))}) depends on {dep} (profiles {sorted(profiles(target))})")
            if condition == "service_healthy":
                assert target.get("healthcheck"), f"{name} waits for {dep} to be healthy: it has no healthcheck"
            elif condition == "service_completed_successfully":
                assert target.get("restart", "no") == "no", f"{dep} is a one-shot: it must not restart"
            else:
                assert condition == "service_started", f"{name}: condition {condition}"


def test_every_sparkle_process_waits_for_the_broker_and_the_bucket(services):
    init = services["minio-init"]
    assert "--ignore-existing" in " ".join(command(init)) and " mb " in " ".join(command(init))
    for name, svc in services.items():
        argv = command(svc)
        if argv[:1] not in (["sparkle"], ["celery"]):
            continue
        deps = depends_on(svc)
        assert deps.get("redis") == "service_healthy", f"{name} must wait for redis"
        assert deps.get("minio-init") == "service_completed_successfully", f"{name} must wait for the bucket"


# --- environment ----------------------------------------------------------------------------------------------

def _nested(prefix: str, model: type[BaseModel]) -> set[str]:
    out = set()
    for field, info in model.model_fields.items():
        name = f"{prefix}{field.upper()}"
        out.add(name)
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out |= _nested(name + "__", ann)
    return out


def _backend_variables() -> set[str]:
    """``SPARKLE_*`` names the model backends read: module-level string constants of services/*/*.py."""
    out = set()
    for path in (ROOT / "services").glob("*/*.py"):
        for node in ast.parse(path.read_text()).body:
            if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
                    and isinstance(node.value.value, str) and re.fullmatch(r"SPARKLE_[A-Z0-9_]+", node.value.value)):
                out.add(node.value.value)
    return out


def _options_from_env_variables() -> set[str]:
    class Recorder(dict):
        def __init__(self):
            super().__init__()
            self.asked = set()

        def get(self, key, default=None):
            self.asked.add(key)
            return default

        def __getitem__(self, key):
            self.asked.add(key)
            raise KeyError(key)

        def __contains__(self, key):
            self.asked.add(key)
            return False

    rec = Recorder()
    options_from_env(rec)
    return rec.asked


def allowed_sparkle_variables() -> set[str]:
    allowed = {"SPARKLE_MANIFEST_ROOT"}
    allowed |= {f"SPARKLE_{f.upper()}" for f in DistributedSettings.model_fields}
    allowed |= {f"SPARKLE_SERVE_{f.upper()}" for f in ServeSettings.model_fields}
    allowed |= _nested("SPARKLE_", PipelineConfig)
    allowed |= _options_from_env_variables()
    allowed |= _backend_variables()
    return allowed


def test_allowed_variables_come_from_the_code():
    allowed = allowed_sparkle_variables()
    for name in ("SPARKLE_BROKER_URL", "SPARKLE_SERVE_MAX_BATCH_SIZE", "SPARKLE_GATES__VIDEO_MIN_MEAN_O_SCORE",
                 "SPARKLE_MODEL_DIR_IMAGE_EDIT", "SPARKLE_DEVICE", "SPARKLE_GROUNDING_URL"):
        assert name in allowed, name
    assert "SPARKLE_BROKER" not in allowed and "SPARKLE_GATES" in allowed


def test_every_sparkle_variable_is_read_by_the_code(compose, services):
    allowed = allowed_sparkle_variables()
    blocks = {f"services.{n}": environment(s) for n, s in services.items()}
    blocks |= {k: v for k, v in compose.items() if k.startswith("x-") and isinstance(v, dict)
               and any(str(key).startswith("SPARKLE_") for key in v)}
    seen = 0
    for where, env in blocks.items():
        for key in env:
            if key.upper().startswith("SPARKLE_"):
                assert key in allowed, f"{where}: {key} is not read by the code (no setting of that name)"
                seen += 1
    assert seen >= 10


def test_each_process_environment_is_accepted_by_the_settings(services, monkeypatch):
    import os

    for name, svc in services.items():
        env = resolved_env(svc)
        if not any(k.startswith("SPARKLE_") for k in env):
            continue
        for key in [k for k in os.environ if k.startswith("SPARKLE_")]:
            monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        DistributedSettings()
        ServeSettings()
        PipelineConfig()
    env = resolved_env(services["gateway"])
    settings = DistributedSettings(**{k[len("SPARKLE_"):].lower(): v for k, v in env.items()
                                      if k[len("SPARKLE_"):].lower() in DistributedSettings.model_fields})
    # the broker, the store's endpoint and its credentials are the compose services' and MinIO's own
    broker = urlsplit(settings.broker_url)
    assert broker.hostname in services and broker.port == 6379 and broker.path == f"/{k8s_render.REDIS_DB_INDEX}"
    host, port = settings.s3_endpoint.split(":")
    assert host == "minio" and port == "9000"
    # MinIO's credentials are files generated by secrets-init (no default password is shipped); the Sparkle
    # processes read the same files as their S3 credentials, and model servers and workers share the API key
    minio = environment(services["minio"])
    gateway = environment(services["gateway"])
    assert "MINIO_ROOT_PASSWORD" not in minio and "SPARKLE_S3_SECRET_KEY" not in gateway
    assert gateway["SPARKLE_S3_ACCESS_KEY_FILE"] == "/run/secrets/" + minio["MINIO_ROOT_USER_FILE"]
    assert gateway["SPARKLE_S3_SECRET_KEY_FILE"] == "/run/secrets/" + minio["MINIO_ROOT_PASSWORD_FILE"]
    generator = " ".join(command(services["secrets-init"]))
    for secret in (minio["MINIO_ROOT_USER_FILE"], minio["MINIO_ROOT_PASSWORD_FILE"], "serve_api_key",
                   "flower_basic_auth"):
        assert secret in generator, secret
    for n, svc in services.items():
        env = resolved_env(svc)
        if any(k.endswith("_FILE") and v.startswith("/run/secrets/") for k, v in env.items()):
            assert any(m["target"] == "/run/secrets" and m["source"] == "secrets" for m in mounts(svc)), n
        if command(svc)[:2] in (["sparkle", "serve"], ["sparkle", "worker"]):
            assert env["SPARKLE_SERVE_API_KEY_FILE"] == "/run/secrets/serve_api_key", n
    assert settings.store_url.startswith("s3://")
    # every Sparkle process sees the same broker and store
    for n, svc in services.items():
        if command(svc)[:1] in (["sparkle"], ["celery"]):
            e = resolved_env(svc)
            assert (e.get("SPARKLE_BROKER_URL"), e.get("SPARKLE_STORE_URL")) == (settings.broker_url,
                                                                                 settings.store_url), n


# --- GPU services ---------------------------------------------------------------------------------------------

def _model_services(services: dict) -> dict[str, str]:
    """GPU-holding model services -> the model service whose weights they load (vLLM: grounding)."""
    out = {}
    for name, svc in active(services, "gpu").items():
        argv = sparkle_argv(svc)
        if argv and argv[0] == "serve" and option(argv, "--model-dir"):
            out[name] = argv[1]
        elif any(m["target"] == MODELS_MOUNT for m in mounts(svc)) or gpu_devices(svc):
            out[name] = "grounding" if "vllm" in str(svc.get("image")) else name
    return out


def test_every_gpu_model_service_reserves_its_own_gpu_and_mounts_its_weights_read_only(services):
    held = _model_services(services)
    assert set(held.values()) == set(SERVICES), f"models held: {held}"
    devices_by_default = {}
    for name, model_service in held.items():
        svc = services[name]
        assert profiles(svc) == {"gpu"}, name
        (device,) = gpu_devices(svc) or [None]
        assert device, f"{name}: no GPU reservation (deploy.resources.reservations.devices)"
        assert device.get("driver") == "nvidia" and "gpu" in device["capabilities"], name
        ids = [resolve(i) for i in device.get("device_ids") or []]
        assert (device.get("count") == 1) != (len(ids) == 1), f"{name}: reserve exactly one GPU"
        for i in ids:
            assert i.isdigit(), f"{name}: device id {i!r}"
            devices_by_default.setdefault(i, []).append(name)
        models = [m for m in mounts(svc) if m["target"] == MODELS_MOUNT]
        assert len(models) == 1 and models[0].get("read_only") is True, f"{name}: /models must be mounted :ro"
        source = resolve(models[0]["source"]).rstrip("/")
        assert source.endswith("/" + model_service), f"{name}: weights from {source}, not a {model_service}/ folder"
    shared = {i: n for i, n in devices_by_default.items() if len(n) > 1}
    assert not shared, f"services on the same GPU by default: {shared}"


def test_grounding_server_is_an_adapter_to_vllm(services):
    name = server_of(services, "grounding")
    svc = services[name]
    argv = sparkle_argv(svc)
    assert option(argv, "--model-dir") is None and not gpu_devices(svc)
    url = urlsplit(resolved_env(svc)["SPARKLE_GROUNDING_URL"])
    assert url.hostname in services, f"SPARKLE_GROUNDING_URL names {url.hostname}, not a compose service"
    vllm = services[url.hostname]
    assert listening_port(vllm) == url.port and url.path == "/v1"
    assert profiles(vllm) == profiles(svc) and gpu_devices(vllm)
    assert depends_on(svc).get(url.hostname) == "service_healthy"
    assert healthcheck_url(vllm) in (f"http://127.0.0.1:{url.port}/health", f"http://localhost:{url.port}/health")


# --- agreement with the Kubernetes manifests ------------------------------------------------------------------

def test_model_services_match_the_kubernetes_plans(services):
    store_url = resolved_env(services["gateway"])["SPARKLE_STORE_URL"]
    for model_service in SERVICES:
        plan = k8s_render.PLANS[model_service]
        server = server_of(services, model_service)
        svc = services[server]
        assert svc["image"] == k8s_render.image(model_service), server
        assert sparkle_argv(svc) == [a.replace("$(SPARKLE_STORE_URL)", store_url)
                                     for a in k8s_render.server_args(model_service, "real")], server
        k8s_server = next(c for c in k8s_render.deployment(model_service)["spec"]["template"]["spec"]["initContainers"]
                          if c["name"] == "model-server")
        env = resolved_env(svc)
        for item in k8s_server["env"]:
            if item["name"] == "SPARKLE_SERVE_API_KEY_FILE":  # where each platform keeps the key: both have one
                assert env[item["name"]].startswith("/run/"), server
                continue
            assert env.get(item["name"]) == item["value"], f"{server}: {item['name']}"
        assert seconds(svc["healthcheck"]["start_period"]) == plan.startup_s, server
        worker = worker_of(services, SERVICE_QUEUES[model_service], "gpu")
        argv = sparkle_argv(services[worker])
        url = option(argv, "--service-url")
        expected = [url if a == f"http://127.0.0.1:{k8s_render.SERVER_PORT}" else a
                    for a in k8s_render.worker_args(model_service)]
        assert argv == expected, f"{worker}: k8s runs `sparkle {' '.join(k8s_render.worker_args(model_service))}`"
        assert seconds(services[worker]["stop_grace_period"]) == plan.grace_s, f"{worker}: warm shutdown time"


def test_vllm_matches_the_kubernetes_sidecar(services):
    patch = k8s_render.gpu_patch("grounding")["spec"]["template"]["spec"]["initContainers"]
    (k8s_vllm,) = [c for c in patch if c["name"] == "vllm"]
    url = urlsplit(resolved_env(services[server_of(services, "grounding")])["SPARKLE_GROUNDING_URL"])
    vllm = services[url.hostname]
    assert vllm["image"] == k8s_render.VLLM_IMAGE
    expected = k8s_vllm["command"] + k8s_vllm["args"]
    expected[expected.index("--host") + 1] = "0.0.0.0"  # its own container here, not the pod's loopback
    assert command(vllm) == expected
    assert seconds(vllm["healthcheck"]["start_period"]) == k8s_render.PLANS["grounding"].startup_s


def test_always_on_processes_match_the_kubernetes_manifests(services):
    orch = k8s_render.orchestrator()[0]["spec"]["template"]["spec"]["containers"][0]
    assert command(services["orchestrator"]) == orch["command"] + orch["args"]
    gateway = k8s_container("gateway.yaml", "Deployment", "gateway")
    assert command(services["gateway"]) == gateway["command"] + gateway["args"]
    flower = k8s_container("flower.yaml", "Deployment", "flower")
    assert command(services["flower"]) == flower["command"] + flower["args"]
    redis = k8s_container("redis.yaml", "StatefulSet", "redis")
    assert command(services["redis"]) == redis["args"] and services["redis"]["image"] == redis["image"]
    minio = k8s_container("minio.yaml", "StatefulSet", "minio")
    assert command(services["minio"]) == minio["args"] and services["minio"]["image"] == minio["image"]
    mc = k8s_container("minio.yaml", "Job", "minio-create-bucket")
    assert services["minio-init"]["image"] == mc["image"]


# --- images and build contexts --------------------------------------------------------------------------------

def _dockerignore() -> list[str]:
    path = ROOT / ".dockerignore"
    if not path.exists():
        return []
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def _ignored(rel: str, patterns: list[str]) -> bool:
    rel = rel.strip("/")
    ignored = False
    for pat in patterns:
        negate = pat.startswith("!")
        pat = pat.lstrip("!").strip("/")
        parts = rel.split("/")
        hit = any(fnmatch.fnmatch("/".join(parts[:i]), pat) for i in range(1, len(parts) + 1))
        if pat.startswith("**/"):
            hit = hit or any(fnmatch.fnmatch(p, pat[3:]) for p in parts)
        if hit:
            ignored = not negate
    return ignored


def _copied(dockerfile: Path) -> list[str]:
    """Sources of the Dockerfile's COPY/ADD instructions from the build context (not --from)."""
    out = []
    text = dockerfile.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        words = line.split()
        if words[:1] and words[0].upper() in ("COPY", "ADD"):
            args = [w for w in words[1:] if not w.startswith("--")]
            if any(w.startswith("--from") for w in words[1:]):
                continue
            out += args[:-1]
    return out


def test_builds_name_existing_dockerfiles_whose_files_are_in_the_context(services):
    ignore = _dockerignore()
    built = {}
    for name, svc in services.items():
        build = svc.get("build")
        if build is None:
            continue
        if isinstance(build, str):
            build = {"context": build}
        context = (ROOT / build.get("context", ".")).resolve()
        assert context.is_dir(), f"{name}: build context {context} missing"
        dockerfile = context / build.get("dockerfile", "Dockerfile")
        assert dockerfile.is_file(), f"{name}: {dockerfile} does not exist"
        assert svc.get("image"), f"{name}: a built image needs a name (image:) that k8s and other services use"
        built[svc["image"]] = name
        for src in _copied(dockerfile):
            assert (context / src).exists(), f"{dockerfile.name} copies {src}, which is not in the context"
            if context == ROOT:
                assert not _ignored(src, ignore), f".dockerignore drops {src}, which {dockerfile} copies"
        for ctx_name, ref in (build.get("additional_contexts") or {}).items():
            if str(ref).startswith("service:"):
                base = str(ref).split(":", 1)[1]
                assert base in services and services[base].get("image") == ctx_name, (
                    f"{name}: context {ctx_name} must be the image that service {base} builds")
                assert profiles(services[base]) >= profiles(svc), f"{base} must be built in {name}'s profiles"
                assert f"FROM ${{BASE}}" in dockerfile.read_text() or f"FROM {ctx_name}" in dockerfile.read_text()
    # every locally built image used by a service is built by the compose file (no pull of a private name)
    for name, svc in services.items():
        image = str(svc.get("image", ""))
        if image.startswith("sparkle-"):
            assert image in built, f"{name}: {image} is not built here"
    assert built.get(k8s_render.BASE_IMAGE), "the CUDA base image (services/Dockerfile.base) is not built"
    # host folders mounted from the repository (weights, inputs) stay out of the build context
    for svc in services.values():
        for m in mounts(svc):
            source = resolve(m["source"])
            if m["type"] == "bind" and source.startswith("./"):
                top = source[2:].split("/")[0]
                assert _ignored(top, ignore), f".dockerignore must exclude {top}/ (bind-mounted data)"


def test_cpu_image_installs_the_extras_the_cpu_processes_need():
    import tomllib

    text = (ROOT / "Dockerfile").read_text()
    m = re.search(r"^ARG EXTRAS=(\S+)", text, re.M)
    assert m, "the root Dockerfile declares ARG EXTRAS=..."
    extras = m.group(1).split(",")
    known = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(extras) <= set(known), f"unknown extras {set(extras) - set(known)}"
    assert {"serve", "distributed"} <= set(extras)  # fastapi/uvicorn/httpx + celery/redis/minio/flower


def test_nothing_is_published_on_all_interfaces_and_no_credential_has_a_default(compose, services):
    """The gateway was published on every interface, open, and MinIO and Flower had default credentials."""
    for name, svc in services.items():
        for port in svc.get("ports") or []:
            assert str(resolve(port)).startswith("127.0.0.1:"), f"{name} publishes {port} beyond this host"
    text = COMPOSE.read_text()
    for default in ("admin:admin", "sparkle-secret", "MINIO_ROOT_PASSWORD:-", "FLOWER_BASIC_AUTH:-"):
        assert default not in text, default
