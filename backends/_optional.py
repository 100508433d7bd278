"""Registry entries of the optional (quantum / cloud) backends. Nothing heavy is imported here.

The cloud backends have a ``check`` (a configured Leap token, no network call), so
:func:`qblock.solve` does not instantiate their sampler: their runners build it themselves with
bounded network timeouts (:mod:`qblock.backends.leap`).
"""

from qblock.backends import BackendSpec, register

_B = "qblock.backends"

register(BackendSpec("qaoa", f"{_B}.qaoa:QAOASampler", "constrained",
                     "QAOA on qiskit-aer (XY mixer from a Dicke state by default; mixer='x' on the penalised QUBO)",
                     requires=("qiskit", "qiskit_aer", "qiskit_optimization", "scipy"), extra="qaoa",
                     runner=f"{_B}.qaoa:run"))
register(BackendSpec("leap-hybrid", "dwave.system:LeapHybridSampler", "penalty",
                     "D-Wave Leap hybrid BQM solver on the penalised QUBO (cloud; needs a Leap token)",
                     requires=("dwave.system",), extra="leap", runner=f"{_B}.leap:run_hybrid",
                     check=f"{_B}.leap:check_token"))
register(BackendSpec("leap-cqm", "dwave.system:LeapHybridCQMSampler", "cqm",
                     "D-Wave Leap hybrid CQM solver, constraint native (cloud; needs a Leap token)",
                     requires=("dwave.system",), extra="leap", runner=f"{_B}.leap:run_cqm",
                     check=f"{_B}.leap:check_token"))
register(BackendSpec("leap-nl", "dwave.system:LeapHybridNLSampler", "constrained",
                     "D-Wave Leap hybrid nonlinear solver: list variable, first M entries removed (cloud; needs a Leap token)",
                     requires=("dwave.system", "dwave.optimization"), extra="leap", runner=f"{_B}.leap:run_nl",
                     check=f"{_B}.leap:check_token"))
register(BackendSpec("dwave-qpu", "dwave.system:DWaveSampler", "penalty",
                     "D-Wave quantum annealer with minor embedding (cloud; needs a Leap token)",
                     requires=("dwave.system", "minorminer"), extra="leap", runner=f"{_B}.leap:run_qpu",
                     check=f"{_B}.leap:check_token"))
register(BackendSpec("sqa", f"{_B}.sqa:SQASampler", "penalty",
                     "OpenJij simulated quantum annealing on the penalised QUBO (penalty scan + repair)",
                     requires=("openjij",), extra="sqa", defaults={"num_reads": 16}))
register(BackendSpec("scip", f"{_B}.miqp:SCIPTopKSampler", "constrained",
                     "SCIP MIQP (open source): certified top-k by no-good cuts",
                     requires=("pyscipopt",), extra="miqp", stochastic=False, defaults={"time_limit": 120.0}))
register(BackendSpec("gurobi", f"{_B}.miqp:GurobiTopKSampler", "constrained",
                     "Gurobi MIQP solution pool (PoolSearchMode=2); the pip licence is size-limited",
                     requires=("gurobipy",), extra="gurobi", stochastic=False, defaults={"time_limit": 120.0}))
