"""End to end: `python -m shared.serve_onnx` as a real process: serve, drain on SIGTERM, workers, TLS."""
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from tests import onnx_models
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent


def start(args, env=None):
    return subprocess.Popen([sys.executable, "-m", "shared.serve_onnx", *args, "--log-format", "text"],
                            cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


class Output:
    """Reads a process's merged output on a thread, so a test can wait for a line to appear."""

    def __init__(self, proc):
        self.text = ""
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(proc.stdout,), daemon=True)
        self._thread.start()

    def _read(self, stream):
        for line in stream:
            with self._cond:
                self.text += line
                self._cond.notify_all()

    def wait_count(self, needle, n, timeout=60.0):
        with self._cond:
            if not self._cond.wait_for(lambda: self.text.count(needle) >= n, timeout):
                raise AssertionError(f"{needle!r} not seen {n} times:\n{self.text[-3000:]}")

    def finish(self):
        self._thread.join(timeout=20)
        return self.text


def wait_ready(channel, timeout=30.0):
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if stub.ServerReady(pb.ServerReadyRequest(), timeout=1).ready:
                return stub
        except grpc.RpcError:
            pass
        time.sleep(0.1)
    raise AssertionError("server did not become ready")


def infer(stub, x):
    req = pb.ModelInferRequest(model_name="linear")
    req.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    req.raw_input_contents.append(x.tobytes())
    resp = stub.ModelInfer(req, timeout=5)
    return np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(-1, 1)


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError("did not stop on SIGTERM:\n" + out[-3000:])
    return proc.returncode, out


def test_serves_a_file_and_drains_on_sigterm(model_files):
    port = free_port()
    proc = start(["--onnx", str(model_files["v_a"]), "--name", "linear", "--port", str(port), "--metrics-port", "0"])
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = wait_ready(ch)
            x = np.ones((2, 4), np.float32)
            np.testing.assert_allclose(infer(stub, x), onnx_models.linear_reference(x, seed=1), rtol=1e-5)
    finally:
        code, out = stop(proc)
    assert code == 0, out[-3000:]
    assert "draining" in out and "stopped" in out


def test_two_workers_share_the_port(model_files):
    port = free_port()
    proc = start(["--onnx", str(model_files["v_a"]), "--name", "linear", "--port", str(port), "--workers", "2",
                  "--metrics-port", "0"])
    output = Output(proc)
    try:
        # A worker still importing when SIGTERM comes dies without a word, so wait for both to serve.
        output.wait_count("listening on", 2)
        for _ in range(6):  # separate connections are spread over the workers by the kernel
            with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
                stub = wait_ready(ch)
                infer(stub, np.ones((1, 4), np.float32))
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(children) == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("did not stop on SIGTERM:\n" + output.finish()[-3000:])
    out = output.finish()
    assert code == 0, out[-3000:]
    assert out.count("stopped") == 2


def test_mutual_tls(model_files, certs):
    port = free_port()
    proc = start(["--onnx", str(model_files["v_a"]), "--name", "linear", "--port", str(port), "--metrics-port", "0",
                  "--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "server.key"),
                  "--tls-client-ca", str(certs / "ca.pem")])
    try:
        ca = (certs / "ca.pem").read_bytes()
        good = grpc.ssl_channel_credentials(ca, (certs / "client.key").read_bytes(), (certs / "client.pem").read_bytes())
        with grpc.secure_channel(f"127.0.0.1:{port}", good) as ch:
            stub = wait_ready(ch)
            assert infer(stub, np.ones((1, 4), np.float32)).shape == (1, 1)
        no_client_cert = grpc.ssl_channel_credentials(ca)
        with grpc.secure_channel(f"127.0.0.1:{port}", no_client_cert) as ch:
            with pytest.raises(grpc.RpcError) as e:
                pb_grpc.GRPCInferenceServiceStub(ch).ServerLive(pb.ServerLiveRequest(), timeout=3)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            with pytest.raises(grpc.RpcError):
                pb_grpc.GRPCInferenceServiceStub(ch).ServerLive(pb.ServerLiveRequest(), timeout=3)
    finally:
        stop(proc)
