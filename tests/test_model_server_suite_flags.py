"""The three flags TF Serving's test suite adds to every command line: --grpc_socket_path (gRPC on a Unix socket
too), --grpc_channel_arguments (gRPC server arguments) and --rest_api_timeout_in_ms (REST deadline, 504 past it)."""
from __future__ import annotations

import asyncio

import grpc
import pytest
from aiohttp import ClientSession, web
from tensorflow_serving.apis import prediction_service_pb2_grpc

from services.model_server.main import parse_grpc_channel_arguments, rest_timeout_middleware
from tests.model_server_harness import MODEL, start_server, stop_server, version_states, wait_until, write_config
from tests.support import free_port
from tests.test_model_server_behaviour import AVAILABLE, predict, publish_tiny


def test_suite_flags_are_accepted_and_grpc_answers_on_the_unix_socket(tmp_path):
    publish_tiny(tmp_path)
    config = tmp_path / "models.config"
    write_config(config, {MODEL: tmp_path / MODEL})
    socket_path = tmp_path / "tf-serving.sock"
    server = start_server(tmp_path, config, f"--grpc_socket_path={socket_path}", "--rest_api_timeout_in_ms=5000",
                          "--grpc_channel_arguments=grpc.max_connection_age_ms=2000,grpc.lb_policy_name=grpclb,"
                          "grpc.so_reuseaddr=1")
    try:
        wait_until(lambda: version_states(server.grpc_target, MODEL).get(1, (0,))[0] == AVAILABLE, what="v1")
        with grpc.insecure_channel(f"unix:{socket_path}") as channel:
            assert predict(prediction_service_pb2_grpc.PredictionServiceStub(channel)) == 1
    finally:
        stop_server(server)


def test_grpc_channel_arguments_are_key_value_pairs_with_integers_as_numbers():
    assert parse_grpc_channel_arguments("") == []
    assert parse_grpc_channel_arguments("grpc.max_connection_age_ms=2000,grpc.lb_policy_name=grpclb") == [
        ("grpc.max_connection_age_ms", 2000), ("grpc.lb_policy_name", "grpclb")]
    with pytest.raises(ValueError, match="key=value"):
        parse_grpc_channel_arguments("grpc.so_reuseaddr")


def test_a_rest_request_past_the_timeout_answers_504():
    async def scenario():
        never = asyncio.Event()

        async def slow(request):
            await never.wait()
            return web.json_response({})

        async def quick(request):
            return web.json_response({"ok": True})

        app = web.Application(middlewares=[rest_timeout_middleware(0.2)])
        app.router.add_get("/slow", slow)
        app.router.add_get("/quick", quick)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            async with ClientSession() as session:
                async with session.get(f"http://127.0.0.1:{port}/slow") as response:
                    slow_answer = response.status, await response.json()
                async with session.get(f"http://127.0.0.1:{port}/quick") as response:
                    quick_answer = response.status, await response.json()
        finally:
            await runner.cleanup()
        return slow_answer, quick_answer

    (slow_status, slow_body), quick = asyncio.run(scenario())
    assert slow_status == 504 and "Deadline" in slow_body["error"]
    assert quick == (200, {"ok": True})
