"""Operations around the federated protocol: config profiles, certificates, the SuperLink's API, Flower's
connection file, processes, launch, submit, simulate, checks and preflight. Imports `federation`, never
the other way round."""
