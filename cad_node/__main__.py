from cad_node.cli import main

main()
