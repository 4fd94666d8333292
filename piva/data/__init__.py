"""Scene data shared by the toy world and the Noe benchmark: cameras, ray casting, Blender datasets."""
