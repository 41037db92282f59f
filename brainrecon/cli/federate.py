"""``brainrecon federate server`` / ``brainrecon federate site``: BrainGuard across labs on Flower.

Thin commands over :mod:`brainrecon.federation`; importing this module
does not import Flower (it is an optional extra: ``pip install 'brainrecon[federated]'``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from brainrecon.errors import BrainreconError

federate_app = typer.Typer(
    help="BrainGuard across sites on Flower: one server, one site per lab (subject). "
         "Needs pip install 'brainrecon\\[federated]'.",  # "\\[": help is rich markup
    no_args_is_help=True,
)


def _decoder_params(params_json: str | None, param: list[str] | None, recipe: str | None,
                    target: str | None, rounds: int | None) -> dict[str, Any]:
    from brainrecon.decoders import apply_recipe

    try:
        params: dict[str, Any] = json.loads(params_json) if params_json else {}
    except ValueError as exc:
        raise BrainreconError(f"--params must be one JSON object, e.g. '{{\"hidden\": 256}}': {exc}") from None
    if not isinstance(params, dict):
        raise BrainreconError(f"--params must be one JSON object, got {params_json!r}.")
    for item in param or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise BrainreconError(f"--param expects key=value, got {item!r}.")
        try:
            params[key.replace("-", "_")] = json.loads(value)
        except ValueError:
            params[key.replace("-", "_")] = value
    if target is not None:
        params["target"] = target
    if rounds is not None:
        params["rounds"] = rounds
    params = apply_recipe("brainguard", recipe, params)
    params.setdefault("target", "pixels")
    from brainrecon.decoders.brainguard import BrainGuardDecoder

    BrainGuardDecoder(**params)._train_config()  # refuse bad settings before any site joins
    return params


@federate_app.command("server")
def server(
    rounds: int | None = typer.Option(None, "--rounds", help="Federated rounds (default: the recipe's, else 600)."),
    sites: int = typer.Option(2, "--sites", help="Sites that must take part in every round."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address the sites connect to (0.0.0.0: all interfaces). Other than loopback it needs TLS and --enable-supernode-auth, or --insecure."),
    port: int = typer.Option(9092, "--port", help="SuperLink port (sites connect to HOST:PORT)."),
    server_dir: Path = typer.Option(Path("brainguard-server"), "--server-dir", help="Where the server keeps the global shared tensors and its logs."),
    target: str | None = typer.Option(None, "--target", "-t", help="pixels | ipadapter."),
    recipe: str | None = typer.Option(None, "--recipe", help="brainguard-released | weadl (see `brainrecon decoders describe brainguard`)."),
    param: list[str] | None = typer.Option(None, "--param", "-p", help="Any BrainGuard parameter as key=value (JSON values)."),
    params_json: str | None = typer.Option(None, "--params", help="All parameters as one JSON object."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the global model saved in --server-dir."),
    insecure: bool = typer.Option(False, "--insecure", help="Plain connections on a non-loopback --host: anyone who reaches it can join the federation and read the global model. For trusted test networks only."),
    ssl_certfile: Path | None = typer.Option(None, "--ssl-certfile", help="TLS certificate of the server."),
    ssl_keyfile: Path | None = typer.Option(None, "--ssl-keyfile", help="TLS private key of the server."),
    ssl_ca_certfile: Path | None = typer.Option(None, "--ssl-ca-certfile", help="CA certificate that signed --ssl-certfile (the sites get it too)."),
    supernode_auth: bool = typer.Option(False, "--enable-supernode-auth", help="Only admit registered sites (Flower SuperNode authentication; needs TLS)."),
    site_public_key: list[Path] | None = typer.Option(None, "--site-public-key", help="A site's public key (OpenSSH ECDSA) to admit under --enable-supernode-auth; once per site."),
    round_timeout: float = typer.Option(3600.0, "--round-timeout", help="Seconds to wait for the sites' replies in a round."),
) -> None:
    """Run the federation server: a Flower SuperLink and the BrainGuard ServerApp; stops when done."""
    from brainrecon.federation.server import serve

    params = _decoder_params(params_json, param, recipe, target, rounds)
    path = serve(params=params, rounds=int(params.get("rounds", 600)), min_sites=sites, server_dir=server_dir,
                 host=host, port=port, resume=resume, insecure=insecure,
                 ssl_certfile=str(ssl_certfile) if ssl_certfile else None,
                 ssl_keyfile=str(ssl_keyfile) if ssl_keyfile else None,
                 ssl_ca_certfile=str(ssl_ca_certfile) if ssl_ca_certfile else None,
                 enable_supernode_auth=supernode_auth, site_public_keys=[str(k) for k in site_public_key or []],
                 round_timeout=round_timeout, recipe=recipe, log=typer.echo)
    typer.echo(f"federation finished; global shared tensors in {path / 'global.safetensors'}")


@federate_app.command("site")
def site(
    subject: int = typer.Option(..., "--subject", "-s", help="This site's subject."),
    data: str = typer.Option(..., "--data", help="This site's prepared data (only --subject is read), or synthetic[:options]."),
    server_address: str = typer.Option(..., "--server", help="The server's HOST:PORT."),
    state_dir: Path = typer.Option(Path("brainguard-site"), "--state-dir", help="The site's own state between rounds (model, fusion weights, optimiser, random state); reuse it to restart a crashed site."),
    out: Path = typer.Option(Path("runs"), "--out", help="Where the site writes its run after the last round."),
    name: str | None = typer.Option(None, "--name", help="Run name (default brainguard-subjXX-<target>)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run of the same name."),
    evaluate: bool = typer.Option(True, "--evaluate/--no-evaluate", help="Score the site's reconstructions."),
    device: str | None = typer.Option(None, "--device", help="This site's device: auto | cpu | cuda | cuda:N."),
    threads: int | None = typer.Option(None, "--threads", help="CPU threads for this site's training."),
    insecure: bool = typer.Option(False, "--insecure", help="Plain connection to a server that is not on loopback: whoever answers there receives this site's shared tensors. For trusted test networks only."),
    root_certificates: Path | None = typer.Option(None, "--root-certificates", help="CA certificate that verifies the server (TLS)."),
    auth_private_key: Path | None = typer.Option(None, "--auth-private-key", help="This site's private key when the server uses --enable-supernode-auth."),
    recipe_name: str | None = typer.Option(None, "--recipe-name", hidden=True, help="Recipe name recorded in the run."),
    worker: bool = typer.Option(True, "--worker/--no-worker", help="Keep the site (data, model, optimiser) in memory in a worker process between rounds; --no-worker rebuilds it from --state-dir in every Flower ClientApp process (slower per round, nothing held between rounds)."),
) -> None:
    """Join a federation as one subject's site (a Flower SuperNode); runs until stopped."""
    from brainrecon.federation.site import run_site

    code = run_site(subject=subject, data=data, server=server_address, state_dir=state_dir, out=out,
                    run_name=name, overwrite=overwrite, evaluate=evaluate, recipe=recipe_name, device=device,
                    threads=threads, insecure=insecure,
                    root_certificates=str(root_certificates) if root_certificates else None,
                    auth_private_key=str(auth_private_key) if auth_private_key else None, worker=worker)
    raise typer.Exit(code)
