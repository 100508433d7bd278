"""Registry entries of the optional (quantum / cloud) backends. Nothing heavy is imported here.

The cloud backends have a ``check`` (a configured Leap token, no network call), so
:func:`qblock.solve` does not instantiate their sampler: their runners build it themselves with
bounded network timeouts (:mod:`qblock.backends.leap`).
"""

from qblock.backends._params import Param
from qblock.backends._spec import _BOTH, PENALTY_PARAMS, BackendSpec, register

_B = "qblock.backends"

_SECONDS = Param("float", low=0, low_open=True, none=True, doc="seconds")
#: network bounds and Ocean client settings of the cloud backends (see qblock.backends.leap.client_config)
_CLIENT = {
    "request_timeout": Param("float", low=0, low_open=True, none=True, doc="seconds per HTTP request"),
    "http_retry_total": Param("int", low=0, none=True),
    "polling_timeout": Param("float", low=0, low_open=True, none=True, doc="seconds to wait for a result"),
    "token": Param("any"), "endpoint": Param("any"), "region": Param("any"), "solver": Param("any"),
    "profile": Param("any"), "config_file": Param("any"),
}
#: what every cloud runner takes besides its own settings
_CLOUD = {
    **_CLIENT,
    "sampler_factory": Param("any", none=True, doc="callable(**config) -> sampler, replaces the Ocean class"),
    "save_dir": Param("any", none=True, doc="folder for the saved run"),
    "label": Param("any", none=True, doc="problem label shown in Leap"),
}
_MIQP = {
    "time_limit": Param("float", low=0, low_open=True, none=True,
                        doc="seconds for the whole top-k; the result is then uncertified"),
    "threads": Param("int", low=1, none=True),
    "verbose": Param("bool"),
}
#: the largest QAOA statevector simulated unless asked (16 bytes * 2^22 = 64 MiB)
DEFAULT_MAX_QUBITS = 22


def _qaoa_qubits(params: dict) -> int | None:
    """QAOA's qubit bound: ``max_qubits``, except that a matrix-product-state simulation has none."""
    return None if params.get("method") == "matrix_product_state" else int(params.get("max_qubits", DEFAULT_MAX_QUBITS))

_AER_METHODS = ("automatic", "statevector", "density_matrix", "stabilizer", "extended_stabilizer",
                "matrix_product_state", "unitary", "superop", "tensor_network")

register(BackendSpec("qaoa", f"{_B}.qaoa:QAOASampler", "constrained",
                     "QAOA on qiskit-aer (XY mixer from a Dicke state by default; mixer='x' on the penalised QUBO)",
                     requires=("qiskit", "qiskit_aer", "qiskit_optimization", "scipy"), extra="qaoa",
                     runner=f"{_B}.qaoa:run", max_variables=_qaoa_qubits, params={
                         "mixer": Param("choice", choices=("xy", "x")),
                         "penalty": Param("float", low=0, none=True, doc="with mixer 'x'"),
                         "repair": Param("bool", doc="with mixer 'x'"),
                         "exact_limit": Param("int", low=0),
                         "reps": Param("int", low=1),
                         "shots": Param("int", low=1),
                         "optimizer": Param("choice", choices=("COBYLA", "Nelder-Mead", "Powell")),
                         "maxiter": Param("int", low=1),
                         "init": Param("choice", choices=("linear_ramp", "random")),
                         "xy_topology": Param("choice", choices=("ring", "complete")),
                         "method": Param("choice", choices=_AER_METHODS),
                         "max_qubits": Param("int", low=1),
                         "restarts": Param("int", low=0),
                         "initial_point": Param("floats", none=True, doc="[gamma_1..gamma_p, beta_1..beta_p]"),
                         "ramp_scale": Param("float", low=0, low_open=True),
                         "threads": Param("int", low=0, none=True),
                     }))
register(BackendSpec("leap-hybrid", "dwave.system:LeapHybridSampler", "penalty",
                     "D-Wave Leap hybrid BQM solver on the penalised QUBO (cloud; needs a Leap token)",
                     requires=("dwave.system",), extra="leap", runner=f"{_B}.leap:run_hybrid",
                     check=f"{_B}.leap:check_token", problems=_BOTH, params={**PENALTY_PARAMS, **_CLOUD, "time_limit": _SECONDS}))
register(BackendSpec("leap-cqm", "dwave.system:LeapHybridCQMSampler", "cqm",
                     "D-Wave Leap hybrid CQM solver, constraint native (cloud; needs a Leap token)",
                     requires=("dwave.system",), extra="leap", runner=f"{_B}.leap:run_cqm",
                     check=f"{_B}.leap:check_token",
                     problems=_BOTH, params={**_CLOUD, "time_limit": _SECONDS, "repair": PENALTY_PARAMS["repair"]}))
register(BackendSpec("leap-nl", "dwave.system:LeapHybridNLSampler", "constrained",
                     "D-Wave Leap hybrid nonlinear solver: list variable, first M entries removed (cloud; needs a Leap token)",
                     requires=("dwave.system", "dwave.optimization"), extra="leap", runner=f"{_B}.leap:run_nl",
                     check=f"{_B}.leap:check_token",
                     params={**_CLOUD, "time_limit": _SECONDS, "polish": PENALTY_PARAMS["polish"]}))
register(BackendSpec("dwave-qpu", "dwave.system:DWaveSampler", "penalty",
                     "D-Wave quantum annealer with minor embedding (cloud; needs a Leap token)",
                     requires=("dwave.system", "minorminer"), extra="leap", runner=f"{_B}.leap:run_qpu",
                     check=f"{_B}.leap:check_token", problems=_BOTH, params={
                         **PENALTY_PARAMS, **_CLOUD,
                         "num_reads": Param("int", low=1, high=10_000, doc="reads per submission"),
                         "chain_strength": Param("float", low=0, low_open=True, none=True),
                         "chain_strength_prefactor": Param("float", low=0, low_open=True),
                         "annealing_time": Param("float", low=0, low_open=True, none=True, doc="microseconds"),
                         "anneal_schedule": Param("any", none=True),
                         "auto_scale": Param("bool"),
                         "programming_thermalization": Param("float", low=0),
                         "readout_thermalization": Param("float", low=0),
                     }))
register(BackendSpec("sqa", f"{_B}.sqa:SQASampler", "penalty",
                     "OpenJij simulated quantum annealing on the penalised QUBO (penalty scan + repair)",
                     requires=("openjij",), extra="sqa", defaults={"num_reads": 16}, problems=_BOTH, params={
                         **PENALTY_PARAMS,
                         "num_reads": Param("int", low=1, doc="independent anneals per penalty strength"),
                         "num_sweeps": Param("int", low=1, none=True),
                         "trotter": Param("int", low=1, none=True),
                         "beta": Param("float", low=0, low_open=True, none=True),
                         "gamma": Param("float", low=0, low_open=True, none=True),
                     }))
register(BackendSpec("scip", f"{_B}.miqp:SCIPTopKSampler", "constrained",
                     "SCIP MIQP (open source): certified top-k by no-good cuts",
                     requires=("pyscipopt",), extra="miqp", stochastic=False, defaults={"time_limit": 120.0},
                     params=_MIQP))
register(BackendSpec("gurobi", f"{_B}.miqp:GurobiTopKSampler", "constrained",
                     "Gurobi MIQP solution pool (PoolSearchMode=2); the pip licence is size-limited",
                     requires=("gurobipy",), extra="gurobi", stochastic=False, defaults={"time_limit": 120.0},
                     params=_MIQP))
