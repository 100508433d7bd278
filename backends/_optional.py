"""Registry entries of the optional (quantum / cloud) backends. Nothing heavy is imported here."""

from qblock.backends import BackendSpec, register

_B = "qblock.backends"

register(BackendSpec("qaoa", f"{_B}.qaoa:QAOASampler", "constrained",
                     "QAOA on qiskit-aer (XY mixer from a Dicke state by default; mixer='x' on the penalised QUBO)",
                     requires=("qiskit", "qiskit_aer", "qiskit_optimization"), extra="qaoa",
                     runner=f"{_B}.qaoa:run"))
register(BackendSpec("leap-hybrid", "dwave.system:LeapHybridSampler", "penalty",
                     "D-Wave Leap hybrid BQM solver (cloud; needs a Leap token)",
                     requires=("dwave.system",), extra="leap", runner=f"{_B}.leap:run_hybrid",
                     check=f"{_B}.leap:check_token"))
register(BackendSpec("leap-cqm", "dwave.system:LeapHybridCQMSampler", "cqm",
                     "D-Wave Leap hybrid CQM solver, constraint native (cloud; needs a Leap token)",
                     requires=("dwave.system",), extra="leap", runner=f"{_B}.leap:run_cqm",
                     check=f"{_B}.leap:check_token"))
register(BackendSpec("dwave-qpu", "dwave.system:DWaveSampler", "penalty",
                     "D-Wave quantum annealer with minor embedding (cloud; needs a Leap token)",
                     requires=("dwave.system", "minorminer"), extra="leap", runner=f"{_B}.leap:run_qpu",
                     check=f"{_B}.leap:check_token"))
